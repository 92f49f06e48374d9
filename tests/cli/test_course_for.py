"""Which course a `class` command means without --course (`cli.overview.course_for`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from labctl.cli.overview import course_for
from labctl.errors import UserError
from labctl.state import CLASS_SHARED, DeploymentRecord, StateStore


def record(dep_id: str, course: str, *, shared: bool = False) -> DeploymentRecord:
    return DeploymentRecord(id=dep_id, name=dep_id, lab="hello", owner="prof" if shared else dep_id, course=course,
                            site="sim:kvm@tacc", status="up", profile_path=None,
                            data={CLASS_SHARED: True} if shared else {})


@pytest.fixture
def ctx(tmp_path):
    return SimpleNamespace(store=StateStore(tmp_path / "state.db"))


def test_the_only_course_with_environments_wins_over_another_courses_shared_group(ctx):
    ctx.store.save_deployment(record("labctl-ml-s1-hello", "ml"))
    ctx.store.save_deployment(record("labctl-os-class-sim-kvm-tacc-hello", "os", shared=True))
    assert course_for(ctx, "hello", None, "down") == "ml"


def test_a_shared_group_left_alone_names_its_course_so_class_down_can_delete_it(ctx):
    ctx.store.save_deployment(record("labctl-ml-class-sim-kvm-tacc-hello", "ml", shared=True))
    assert course_for(ctx, "hello", None, "down") == "ml"


def test_no_class_of_the_lab_is_one_line_error(ctx):
    with pytest.raises(UserError, match="no class has environments of lab 'hello'"):
        course_for(ctx, "hello", None, "down")
