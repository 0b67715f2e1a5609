"""autolr_experiments: the experiment harness of autolr_fast, not the library.

The demo, the schedule-quality comparison, online meta-training, the action controller's data
collection and training, the range-finder and benchmark commands (``python -m autolr_fast
<command>`` routes to them). It uses the library only through its public API and a few
documented internals, and is installed with the ``experiments`` extra (mnist1d, scikit-learn,
matplotlib, numpy), or the ``compare`` extra, which adds schedulefree, prodigyopt and
torch-lr-finder for the comparison's reference methods.

Every training run goes through :func:`autolr_experiments.training.train` (or its step
functions), with one :class:`~autolr_experiments.training.Method` per learning-rate schedule.
"""
