"""Host offload of a role (engine.worker.offload): values, optimizer states and tensor identities survive a
round trip, the device storage is really released, and a model used while offloaded fails."""

from __future__ import annotations

import pytest
import torch

from engine.worker.offload import Role


def test_offload_round_trip_keeps_values_and_identities_and_frees_storage() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    model.register_buffer("scale", torch.full((2,), 3.0))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 6)).sum().backward()
    opt.step()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    states = [{k: v.clone() for k, v in st.items()} for st in opt.state.values()]
    params = [id(p) for p in model.parameters()]
    role = Role("critic", [model], opt, enabled=True)
    resident = role.resident_bytes()
    assert resident > 0
    role.offload()
    assert role.offloaded and role.resident_bytes() == 0 and role.host_bytes == resident
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 6))  # no bytes behind the parameters: it cannot compute on stale values
    with role.resident():
        assert not role.offloaded
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
        for before, st in zip(states, opt.state.values(), strict=True):
            assert all(torch.equal(before[k], v) for k, v in st.items())
        assert [id(p) for p in model.parameters()] == params
        model(torch.randn(4, 6)).sum().backward()
        opt.step()  # the optimizer still updates the same tensors
    assert role.offloaded  # enabled: offloaded again after the phase


def test_a_role_that_is_not_offloaded_stays_resident() -> None:
    model = torch.nn.Linear(3, 3)
    role = Role("reference", [model], enabled=False)
    with role.resident():
        pass
    assert not role.offloaded and role.resident_bytes() > 0
