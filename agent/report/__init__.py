"""The static HTML report built from the store (``autoexplain report``): index, feature pages, circuit pages.

:func:`build_report` reads the database (read-only is enough) and writes a folder that opens from disk, offline.
"""

from autoexplain.agent.report.build import ReportResult, build_report, check_out_dir

__all__ = ["ReportResult", "build_report", "check_out_dir"]
