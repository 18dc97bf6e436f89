"""`serve` builds conserve-adaptive with every instance's tier model and link, as the simulator does
(placement/adaptive.py fleet_options), so the live router costs turn 1 like the simulator."""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import parse_fleet
from orchestrator.fleet import tier_model
from orchestrator.runtime import ServeSettings, SimInstance, build_runtime
from placement.adaptive import AdaptiveConservePolicy
from placement.base import Role


def test_serve_binds_the_fleet_models_to_the_adaptive_policy(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    cfg = parse_fleet(
        {
            "model": "Qwen3-0.6B",
            "backend": "sim",
            "tiers": [
                {
                    "name": "a40",
                    "gpu": "A40",
                    "count": 2,
                    "roles": ["prefill", "decode"],
                    "link": "infiniband",
                }
            ],
            "database_url": db_url,
        }
    )
    tm = tier_model(cfg, "a40")
    capped = tier_model(cfg, "a40", 200.0)
    instances = [SimInstance("p0", "a40", Role.PREFILL, tm), SimInstance("d0", "a40", Role.DECODE, capped)]
    settings = ServeSettings(
        fleet=Path("inline"),
        db=db_url,
        policy="conserve-adaptive",
        ledger_writer="thread",
        energy_interval_s=0,
    )
    rt = build_runtime(settings, cfg, instances=instances)
    try:
        pol = rt.router.policy
        assert isinstance(pol, AdaptiveConservePolicy)
        assert pol.instance_models == {"p0": tm, "d0": capped}
        assert pol.instance_links == {"p0": "infiniband", "d0": "infiniband"}
    finally:
        rt.writer.close()
        rt.ledger.close()
