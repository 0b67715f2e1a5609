# autolr package config for the sources shipped inside the autolr_fast Python package.
#
#   cmake -Dautolr_DIR=$(python -m autolr_fast export --cmake-dir) ...
#   find_package(autolr REQUIRED)
#   target_link_libraries(my_trainer PRIVATE autolr::autolr)     # static, or autolr::autolr_shared
#
# The runtime is compiled as part of the consuming project (it is ~600 lines of C++17, no deps).
get_filename_component(_autolr_src "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)
if(NOT TARGET autolr::autolr)
  add_subdirectory("${_autolr_src}" "${CMAKE_BINARY_DIR}/_autolr_runtime" EXCLUDE_FROM_ALL)
endif()
set(autolr_INCLUDE_DIRS "${_autolr_src}/include")
set(autolr_VERSION 0.1.0)
set(autolr_FOUND TRUE)
