"""Session fixtures: real servers on free loopback ports (the OAuth2 dev server, OpenBao) and moto."""

from fixtures_stores import *  # noqa: F401,F403  (OpenBao dev server, moto Secrets Manager)
from fixtures_oauth import *  # noqa: F401,F403  (the stateful token endpoint)
from reliability_report import pytest_sessionfinish, report  # noqa: F401  (docs/reliability.md rows)
from fixtures_raft import *  # noqa: F401,F403,E402  (a 3-node OpenBao cluster with Raft storage)
