"""The budget ledger, a named part of the system: every task's spend, reservations and
limits, shared by the planner and the executors.

* ``domain``: the rules (reserve the worst case, settle to the truth, pause, approve,
  close), pure;
* ``adapters``: the records in their KV bucket, with compare-and-set;
* the record and its bucket are contracts: ``agentbus.contracts.LedgerRecord``,
  ``agentbus.contracts.subjects.BUDGET_LEDGER_BUCKET``.
"""

from agentbus.contracts import LEDGER_KINDS, LedgerStatus, Limits, Spend

from .adapters import BudgetLedger
from .domain import (
    WARN_AT,
    BudgetRefused,
    Decision,
    Hold,
    Ledger,
    Publish,
    Verdict,
    amount,
    approve_hint,
)

__all__ = [
    "LEDGER_KINDS",
    "WARN_AT",
    "BudgetLedger",
    "BudgetRefused",
    "Decision",
    "Hold",
    "Ledger",
    "LedgerStatus",
    "Limits",
    "Publish",
    "Spend",
    "Verdict",
    "amount",
    "approve_hint",
]
