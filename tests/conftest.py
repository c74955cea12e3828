"""Session fixtures: real servers on free loopback ports (the OAuth2 dev server, OpenBao) and moto."""

from fixtures_stores import *  # noqa: F401,F403  (OpenBao dev server, moto Secrets Manager)
from fixtures_oauth import *  # noqa: F401,F403  (the stateful token endpoint)
from security_report import pytest_collection_finish  # noqa: F401  (docs/security.md, scripts/security-report)
from reliability_report import pytest_sessionfinish, pytest_sessionstart, report  # noqa: F401  (docs/reliability.md rows)
from fixtures_raft import *  # noqa: F401,F403,E402  (a 3-node OpenBao cluster with Raft storage)

import atexit as _atexit  # noqa: E402
import os as _os  # noqa: E402
import shutil as _shutil  # noqa: E402
import tempfile as _tempfile  # noqa: E402

# `tokensmith run` keeps a validated-config cache (configcache.py): the tests' daemons use their own.
_os.environ["CACHE_DIRECTORY"] = _tempfile.mkdtemp(prefix="tokensmith-test-cache-")
_atexit.register(_shutil.rmtree, _os.environ["CACHE_DIRECTORY"], True)
