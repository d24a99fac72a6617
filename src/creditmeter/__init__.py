"""creditmeter: a gRPC credit metering server with atomic Redis balances.

Three layers, no import running upward: transport (gRPC, HTTP/JSON, CLI) -> domain (the
rules) -> storage (Redis scripts, the ledger, the config store).

The request path of a Consume, file by file:
  transport/server.py         App: the grpc.aio server, its workers and background jobs
  transport/interceptors.py   the API key -> tenant and role (domain/keys.py); every
                              domain error -> its status, ErrorInfo and BadRequest
  transport/credits_servicer  Consume: protobuf -> a domain call (transport/convert.py)
  domain/metering.py          Metering.consume: validation, the rate (domain/rates.py),
                              the limit args (domain/limits.py, with the recharge default
                              of domain/recharge.py), the backlog gate, the script Call
  storage/redis_store.py      RedisStore.consume: keys (storage/layout.py) and arguments,
                              batched per bucket (storage/coalescer.py), one FCALL
  storage/lua/consume.lua     check-and-decrement, atomic, with _lib.lua (wrapped by
                              storage/scripts.py): limits, idempotency record, counters,
                              a recharge falling due, and one outbox entry (XADD to the
                              bucket's stream; its format: storage/entries.py)
The reply comes back the same way; nothing on this path waits for the ledger.

The ledger path of the same Consume:
  the bucket's outbox stream  "{b}:outbox" in Redis, written by the script above
  storage/ledger/flusher.py   Flusher: reads the outboxes (consumer group, a lease per
                              bucket: storage/leases.py), decodes each entry's events and
                              request record (storage/entries.py), writes them in one
                              transaction with their webhook notices, then acknowledges
  storage/ledger/sqlite.py    Ledger.append (base.Ledger): one executemany per table, or
                              postgres.py's COPY; the ledger's other queries and rules
                              are storage/ledger/sql.py's, once for both dialects
  run by                      `creditmeter flush`, the child process App starts
                              (App._supervise_flusher; `serve --flusher process`), or on
                              the server's loop (App._flush_inline; `--flusher inline`)
Read back by domain/history.py (ListTransactions, usage reports), domain/recovery.py
(audit, rebuild of Redis), domain/webhooks.py (deliveries) and domain/recharge.py (the
pending purchases of recharges).
"""

__version__ = "0.1.0"
