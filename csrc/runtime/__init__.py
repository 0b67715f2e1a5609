"""C/C++ runtime sources, shipped as package data of ``autolr_fast.runtime`` (see docs/runtime.md).

Nothing to import: ``autolr_fast.exporting.cmake_dir()`` and ``include_dir()`` point into this folder.
"""
