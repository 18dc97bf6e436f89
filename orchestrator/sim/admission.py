"""Router-side KV admission now lives in the driver core (orchestrator/core/admission.py); re-exported here
for the simulator's existing importers."""

from orchestrator.core.admission import DEFAULT_RULE, RULES, AdmissionRule, Reserve, rule_for

__all__ = ["DEFAULT_RULE", "RULES", "AdmissionRule", "Reserve", "rule_for"]
