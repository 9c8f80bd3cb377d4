"""The team deployment: PostgreSQL, an S3 object store, MLflow and Prefect servers, a worker pool.

See docs/team.md. ``TeamServices(state_dir).up()`` starts it on 127.0.0.1; ``env()`` (or the
``team.env`` file) hands clients the standard variables that point at it.
"""

from lightclip.services.dvc_remote import TEAM_REMOTE, configure_dvc_remote
from lightclip.services.processes import ServicesError
from lightclip.services.team import ServiceStatus, TeamServices, postgres_available

__all__ = ["TEAM_REMOTE", "ServiceStatus", "ServicesError", "TeamServices", "configure_dvc_remote", "postgres_available"]
