"""The capacity a plan uses per node id stays put across re-measurements within a factor 2."""

from __future__ import annotations

import pytest

from edgecluster.runtime.capacity import CapacityMemory, capacity_bucket


def test_a_rejoin_measured_faster_or_slower_within_a_factor_2_keeps_the_planned_capacity() -> None:
    memory = CapacityMemory()
    first = memory.planned("node-a", 61.0)  # measured under load at the first start
    assert first == capacity_bucket(61.0)
    assert memory.planned("node-a", 89.0) == first  # idle at the restart: the same split
    assert memory.planned("node-a", 35.0) == first
    assert memory.planned("node-a", 2 * first) == first  # the bound itself still counts


def test_a_measurement_beyond_a_factor_2_moves_the_plan_and_becomes_the_reference() -> None:
    memory = CapacityMemory()
    first = memory.planned("node-a", 60.0)
    moved = memory.planned("node-a", 300.0)  # a different device (or quota) behind the id
    assert moved == capacity_bucket(300.0) and moved != first
    assert memory.planned("node-a", 200.0) == moved  # hysteresis around the new reference
    assert memory.planned("node-a", 20.0) == capacity_bucket(20.0)


def test_nodes_are_remembered_separately() -> None:
    memory = CapacityMemory()
    assert memory.planned("a", 10.0) == capacity_bucket(10.0)
    assert memory.planned("b", 100.0) == capacity_bucket(100.0)
    assert memory.planned("a", 15.0) == capacity_bucket(10.0)


def test_tolerance_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="factor"):
        CapacityMemory(tolerance=0.5)
