"""The outbox entry format: one entry per script call, decoded into its events.

A script call appends one entry to its bucket's outbox (flush_events in _lib.lua), with
the fields

    t  tenant   a  account   x  transaction id   r  request id ('' for none)   ts  time (ms)
    e  the events: a cjson array of [txn suffix, kind, seq, name, value, ...]
    fp, reply   the request record (present when the call was idempotent): the request's
                fingerprint and the encoded reply, the durable copy of the idempotency record
    c, s        a consume's encoded reply, which stands for its `consume` events (one per
                lot it took from, and one with no lot and source `debt` for the part that
                became debt, see `_consume_events`), and the account's seq after them;
                with `fp`, `c` is the request record's reply too (no `reply` field)

Each event belongs to transaction `x` followed by its suffix ('' for the call's own
transaction; 'x' for the expiries swept first, 'r' for the lots a reset removed, 'd' for
a recharge falling due after the call's changes), and its
id is "<txn>:<n>", n counting the events of its transaction from 1; the request record is
the call transaction's last event, "<x>:<n + 1>". Releases before 0.2 wrote one entry per
event with those fields spelled out (`event_id`, `txn`, `kind`, ...): `events` reads both,
so an outbox written by either is drained and watched alike (a grant of 0.1.0 gains the
`rolls_over` its release did not write).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from creditmeter.storage.layout import V1_ROLLS_OVER
from creditmeter.storage.ledger.base import HOLD_KINDS, Event, RequestRecord

#: The transaction suffix of a recharge falling due (recharge_watch in _lib.lua).
RECHARGE_SUFFIX = "d"
#: A field only the entries of 0.1.0 have (one event per entry, spelled out).
_V1_FIELD = "event_id"


def events(fields: Mapping[str, str]) -> list[dict[str, str]]:
    """The events of one entry, each as its fields (event_id, txn, kind, seq, tenant,
    account, request_id, ts, then its own), the request record last as kind `request`."""
    if _V1_FIELD in fields:
        event = dict(fields)
        if event.get("kind") == "grant" and V1_ROLLS_OVER.fullmatch(event.get("reference", "")):
            event["rolls_over"] = "1"
        return [event]
    txn = fields["x"]
    header = {
        "tenant": fields["t"],
        "account": fields["a"],
        "request_id": fields["r"],
        "ts": fields["ts"],
    }
    counts: dict[str, int] = {}
    out: list[dict[str, str]] = []
    seq = "0"
    items = _event_items(fields["e"])
    consumed = fields.get("c")
    due: list[dict[str, str]] = []
    for item in items:
        event_txn = txn + item[0]
        n = counts[event_txn] = counts.get(event_txn, 0) + 1
        seq = item[2]
        event = {"event_id": f"{event_txn}:{n}", "txn": event_txn, "kind": item[1], "seq": seq}
        event.update(header)
        event.update(zip(item[3::2], item[4::2], strict=True))
        # A consume's recharge_due follows its charges (it has the later seq).
        (due if consumed is not None and item[0] == RECHARGE_SUFFIX else out).append(event)
    if consumed is not None:
        charged = _consume_events(json.loads(consumed), int(fields["s"]), header)
        out.extend(charged)
        out.extend(due)
        counts[txn] = counts.get(txn, 0) + len(charged)
        seq = fields["s"]
    if "fp" in fields:
        n = counts.get(txn, 0) + 1
        request = {"event_id": f"{txn}:{n}", "txn": txn, "kind": "request", "seq": seq}
        request.update(header)
        request["fp"] = fields["fp"]
        request["reply"] = fields["reply"] if consumed is None else consumed
        out.append(request)
    return out


def _event_items(encoded: str) -> list[list[str]]:
    """The `e` array (most entries have none: a consume's events are in its reply)."""
    if encoded == "[]":
        return []
    return json.loads(encoded) or []  # an empty cjson table is "{}"


def ledger_records(fields: Mapping[str, str]) -> tuple[list[Event], RequestRecord | None]:
    """What of one entry goes to the ledger: its events (not the holds, which are hot
    state) and its request record. The same as `events` gives, built without the dicts
    for the flusher's common entry, a consume with nothing swept."""
    consumed = fields.get("c")
    if consumed is None or fields["e"] != "[]" or _V1_FIELD in fields:
        found: list[Event] = []
        request = None
        for event in events(fields):
            kind = event["kind"]
            if kind == "request":
                request = RequestRecord.from_fields(event)
            elif kind not in HOLD_KINDS:
                found.append(Event.from_fields(event))
        return found, request
    txn, tenant, account, request_id = fields["x"], fields["t"], fields["a"], fields["r"]
    ts = int(fields["ts"])
    reply = json.loads(consumed)
    units, feature = reply[3], reply[4]
    charges = _charges(reply)
    seq = int(fields["s"]) - len(charges) + 1
    unit_count = int(units)
    found = [
        Event(f"{txn}:{i + 1}", tenant, account, "consume", txn, seq + i, request_id, ts,
              lot, int(taken), credit, feature, unit_count if i == 0 else 0, None, None,
              source)
        for i, (lot, taken, credit, source) in enumerate(charges)
    ]  # fmt: skip
    request = (
        RequestRecord(tenant, account, request_id, fields["fp"], consumed, txn, ts)
        if "fp" in fields
        else None
    )
    return found, request


def header(fields: Mapping[str, str]) -> tuple[str, str, str]:
    """(transaction id, tenant, account) of an entry of either format."""
    if _V1_FIELD in fields:
        return fields.get("txn", ""), fields.get("tenant", ""), fields.get("account", "")
    return fields["x"], fields["t"], fields["a"]


#: The places in consume.lua's reply: txn, amount, units, feature, credit in lots after,
#: reserved, unlimited, time, then lot, amount of each lot touched; in a reply "OK3" (an
#: account in debt after the charge) debt incurred, debt after and the overdraft limit
#: come before the lots.
CONSUME_CHARGES_AT = 9
CONSUME_WITH_DEBT = "OK3"
#: The source of a charge event for the part of a charge that became debt (no lot).
DEBT_SOURCE = "debt"


def _charges(reply: list[str]) -> list[tuple[str, str, int, str]]:
    """What a consume's reply says it took: (lot, credits, credit in lots after it, "")
    per lot touched, in burn order, then ("", credits, credit in lots, "debt") for what
    became debt; one ("", amount, -1, "") on an unlimited account."""
    amount, balance, unlimited = reply[2], reply[5], reply[7]
    if unlimited == "1":
        return [("", amount, -1, "")]
    at, owed = CONSUME_CHARGES_AT, "0"
    if reply[0] == CONSUME_WITH_DEBT:
        owed, at = reply[at], at + 3
    charges = reply[at:]
    left = int(balance)
    taken_after: list[tuple[str, str, int, str]] = []
    if owed != "0":
        taken_after.append(("", owed, left, DEBT_SOURCE))
    for lot, taken in reversed(list(zip(charges[::2], charges[1::2], strict=True))):
        taken_after.append((lot, taken, left, ""))
        left += int(taken)
    taken_after.reverse()
    return taken_after


def _consume_events(
    reply: list[str], last_seq: int, header: Mapping[str, str]
) -> list[dict[str, str]]:
    """The `consume` events a consume's reply stands for: one per lot touched, each with
    the credit in lots after it (or one with no lot and balance -1 when unlimited)."""
    txn, _amount, units, feature, _balance, reserved = reply[1:7]
    charges = _charges(reply)
    first_seq = last_seq - len(charges) + 1
    out = []
    debt = reply[CONSUME_CHARGES_AT + 1] if reply[0] == CONSUME_WITH_DEBT else None
    for i, (lot, taken, credit, source) in enumerate(charges):
        event = {
            "event_id": f"{txn}:{i + 1}", "txn": txn, "kind": "consume",
            "seq": str(first_seq + i),
        }  # fmt: skip
        event.update(header)
        event.update(
            lot=lot, amount=taken, feature=feature, units=units if i == 0 else "0",
            balance=str(credit), reserved=reserved,
        )  # fmt: skip
        if source:
            event["source"] = source
        if debt is not None:
            # The debt after the event (balance watchers): the last event's is the reply's.
            event["debt"] = debt if i == len(charges) - 1 else str(int(debt) - int(reply[9]))
            event["od"] = reply[CONSUME_CHARGES_AT + 2]
        out.append(event)
    return out
