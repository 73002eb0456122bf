"""Controlled comparisons of presets: equal budget, same data and seeds, noise shown (``moekit compare``).

Python use::

    from moekit.compare import load_study, run_study
    result = run_study(load_study("moe-vs-dense", quick=True), "runs/compare/moe-vs-dense-quick")
    print(result.markdown)

The pieces: :mod:`.study` (the TOML format), :mod:`.plan` (configs, budgets, cache keys), :mod:`.runner`
(cached, resumable, parallel execution), :mod:`.report` (table and JSON) and :mod:`.plots`.
"""

from .api import StudyResult, run_study
from .plan import FLOPS_TOLERANCE, RunSpec, arm_config, describe_plan, plan_study, run_key
from .report import ArmResult, aggregate, markdown_report
from .runner import RunOutcome, run_specs
from .study import Arm, Budget, Study, list_studies, load_study

__all__ = ["Study", "Arm", "Budget", "load_study", "list_studies", "plan_study", "describe_plan", "RunSpec",
           "arm_config", "run_key", "run_specs", "RunOutcome", "aggregate", "ArmResult", "markdown_report",
           "run_study", "StudyResult", "FLOPS_TOLERANCE"]
