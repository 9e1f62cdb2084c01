"""Fixtures of the fault tests: the suite's own scenarios at their smallest (``Ctx.ci``), on real processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.faults.live import base_settings, one_thread_profile
from tools.faults.scenarios import Ctx


@pytest.fixture(scope="session")
def fault_profile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This host's measured profile (measured once if not cached), one thread per CPU device."""
    return one_thread_profile(tmp_path_factory.mktemp("fault-profile"), base_settings())


@pytest.fixture
def ctx(tmp_path: Path, fault_profile: Path) -> Ctx:
    settings = base_settings().with_(profile=str(fault_profile))
    return Ctx(quick=True, ci=True, out=tmp_path, profile=fault_profile, settings=settings, say=lambda _m: None)
