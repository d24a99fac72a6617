// creditmeter from TypeScript: grant credits, consume a text message, read the account's
// history, meter a voice call (StartSession -> UpdateSession -> EndSession), check before
// use, cap a feature with a daily usage limit, open a credit line and set a recharge
// threshold; on the way, decode the google.rpc error details of a refused overdraft, of an
// invalid request and of a passed usage limit.
//
//   CREDITMETER_SERVER=127.0.0.1:50051 CREDITMETER_API_KEY=cm_... npx tsx example.ts
//
// The key must be an admin key (Grant needs one). Exits 0 when every call behaved as the
// API documents.
import { randomUUID } from "node:crypto";
import { fromBinary } from "@bufbuild/protobuf";
import { base64Decode } from "@bufbuild/protobuf/wire";
import { anyUnpack, timestampDate } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import {
  Credits,
  TransactionKind,
  UsageLimitPeriod,
  UsageLimitUnit,
  type Transaction,
} from "./gen/credits/v1/credits_pb.js";
// Generated from ../../proto/google/rpc, the googleapis files shipped with the API.
import {
  BadRequestSchema,
  ErrorInfoSchema,
  type BadRequest,
  type ErrorInfo,
} from "./gen/google/rpc/error_details_pb.js";
import { StatusSchema } from "./gen/google/rpc/status_pb.js";

const server = process.env.CREDITMETER_SERVER ?? "127.0.0.1:50051";
const apiKey = process.env.CREDITMETER_API_KEY;
if (!apiKey) {
  console.error("set CREDITMETER_API_KEY to an admin key (creditmeter keys create --role admin)");
  process.exit(2);
}

// Every RPC carries the key as `authorization: Bearer <key>` metadata.
const withApiKey: Interceptor = (next) => async (req) => {
  req.header.set("authorization", `Bearer ${apiKey}`);
  return next(req);
};

// The server speaks gRPC over plaintext HTTP/2 (put TLS in front of it in production
// and use an https:// base URL here).
const transport = createGrpcTransport({
  baseUrl: server.includes("://") ? server : `http://${server}`,
  interceptors: [withApiKey],
  defaultTimeoutMs: 10_000,
});
const credits = createClient(Credits, transport);

const account = `example-${randomUUID().slice(0, 8)}`;

// The reason of the google.rpc.ErrorInfo the server attaches to every error (AIP-193).
// Connect has already decoded the status details; findDetails unpacks those of a type.
function reason(e: ConnectError): string {
  return e.findDetails(ErrorInfoSchema)[0]?.reason ?? "";
}

// The same details decoded by hand, as a client of any gRPC library can: the
// grpc-status-details-bin trailer is a serialized google.rpc.Status (base64 on the wire,
// as all binary metadata), whose details are Anys unpacked by type URL
// (type.googleapis.com/google.rpc.ErrorInfo, type.googleapis.com/google.rpc.BadRequest).
function statusDetails(e: ConnectError): { info?: ErrorInfo; badRequest?: BadRequest } {
  const raw = e.metadata.get("grpc-status-details-bin");
  const found: { info?: ErrorInfo; badRequest?: BadRequest } = {};
  if (raw === null) return found;
  for (const detail of fromBinary(StatusSchema, base64Decode(raw)).details) {
    found.info ??= anyUnpack(detail, ErrorInfoSchema);
    found.badRequest ??= anyUnpack(detail, BadRequestSchema);
  }
  return found;
}

// History comes from the durable ledger, which trails the balance by the flush lag
// (normally well under a second): poll briefly until the consume shows up.
async function history(expected: number): Promise<Transaction[]> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    const page = await credits.listTransactions({ accountId: account, pageSize: 10 });
    if (page.transactions.length >= expected || Date.now() > deadline) {
      return page.transactions;
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

async function meterVoiceCall(): Promise<void> {
  const sessionId = `call-${randomUUID()}`;
  try {
    const started = await credits.startSession({
      accountId: account,
      feature: "voice",
      sessionId,
      requestedSeconds: 60n,
    });
    console.log(
      `voice session ${sessionId} started: ${started.grantedSeconds}s granted, ` +
        `balance ${started.balance}`,
    );
    const updated = await credits.updateSession({
      accountId: account,
      sessionId,
      sequence: 1n,
      usedSeconds: 45n,
    });
    console.log(
      `voice session updated: charged ${updated.chargedAmount}, ` +
        `${updated.grantedSeconds}s granted, balance ${updated.balance}`,
    );
    const ended = await credits.endSession({
      accountId: account,
      sessionId,
      sequence: 2n,
      usedSeconds: 20n,
    });
    console.log(
      `voice session ended: charged ${ended.chargedAmount}, released ` +
        `${ended.releasedAmount}, total charged ${ended.session?.chargedAmount}, ` +
        `balance ${ended.balance}`,
    );
  } catch (err) {
    throw new Error(`voice session: ${ConnectError.from(err).message}`);
  }
}

// Check answers what Consume would decide, changing nothing; a usage limit caps a feature
// per calendar period (here the account's own: 2 text messages a day), and a charge that
// would pass it fails with FAILED_PRECONDITION and reason USAGE_LIMIT_EXCEEDED, whose
// metadata says the limit, the usage and when the period ends.
async function checkAndLimit(): Promise<void> {
  const price = await credits.check({ accountId: account, feature: "voice", quantity: 90n });
  console.log(
    `check: 90 s of voice ${price.allowed ? "allowed" : "refused"}, would cost ` +
      `${price.amount} credits (${price.units} increments), balance ${price.balance}`,
  );
  const capped = `${account}-capped`;
  await credits.grant({ accountId: capped, amount: 100n, requestId: randomUUID() });
  await credits.setUsageLimit({
    accountId: capped,
    limit: {
      feature: "text",
      period: UsageLimitPeriod.DAY,
      limit: 2n,
      unit: UsageLimitUnit.UNITS,
    },
    requestId: randomUUID(),
  });
  await credits.consume({ accountId: capped, feature: "text", quantity: 2n, requestId: randomUUID() });
  const denied = await credits.check({ accountId: capped, feature: "text" });
  if (denied.allowed || denied.denial?.reason !== "USAGE_LIMIT_EXCEEDED") {
    throw new Error(`check past the limit answered ${JSON.stringify(denied.denial)}`);
  }
  try {
    await credits.consume({ accountId: capped, feature: "text", requestId: randomUUID() });
    throw new Error("a charge past the daily limit was accepted");
  } catch (err) {
    const e = ConnectError.from(err);
    if (e.code !== Code.FailedPrecondition || reason(e) !== "USAGE_LIMIT_EXCEEDED") throw err;
    const meta = e.findDetails(ErrorInfoSchema)[0]?.metadata ?? {};
    console.log(
      `usage limit refused the 3rd text: ${meta.used}/${meta.limit} ${meta.unit} this ` +
        `${meta.period}, resets ${meta.period_end}`,
    );
  }
  const [status] = (await credits.listUsageLimits({ accountId: capped })).limits;
  if (status?.used !== 2n || status.remaining !== 0n) {
    throw new Error(`ListUsageLimits answered ${status?.used}/${status?.remaining}`);
  }
}

// A credit line lets charges take the balance down to -overdraft_limit: the part past the
// lots is debt, which the next grant repays first. A recharge policy records one
// recharge_due (and, with a pack, creates a pending purchase) each time the balance falls
// below its threshold.
async function creditLineAndRecharge(): Promise<void> {
  const owing = `${account}-owing`;
  await credits.grant({ accountId: owing, amount: 10n, requestId: randomUUID() });
  await credits.setAccountOptions({ accountId: owing, overdraftLimit: 50n, requestId: randomUUID() });
  await credits.setRechargePolicy({
    accountId: owing,
    policy: { threshold: 5n, packId: "" },
    requestId: randomUUID(),
  });
  await credits.consume({ accountId: owing, feature: "text", amount: 30n, requestId: randomUUID() });
  const owed = await credits.getBalance({ accountId: owing });
  if (owed.balance !== 0n || owed.debt !== 20n) {
    throw new Error(`after charging 30 of 10: balance ${owed.balance}, debt ${owed.debt}`);
  }
  await credits.grant({ accountId: owing, amount: 25n, requestId: randomUUID() });
  const repaid = await credits.getBalance({ accountId: owing });
  console.log(
    `credit line: charged 30 of a balance of 10 (debt 20); a grant of 25 repaid it: ` +
      `balance ${repaid.balance}, debt ${repaid.debt}`,
  );
  const recharge = await credits.getRechargePolicy({ accountId: owing });
  console.log(`recharge policy of ${owing}: below ${recharge.policy?.threshold} credits`);
}

async function main(): Promise<void> {
  const granted = await credits.grant({
    accountId: account,
    amount: 1000n,
    requestId: randomUUID(),
  });
  console.log(`granted ${granted.lot?.amount} credits to ${account}: balance ${granted.balance}`);

  const consumed = await credits.consume({
    accountId: account,
    feature: "text",
    quantity: 1n,
    requestId: randomUUID(),
  });
  console.log(
    `consumed ${consumed.amount} credits for ${consumed.units} text message(s) ` +
      `(transaction ${consumed.transactionId}): balance ${consumed.balance}`,
  );

  // An all-or-nothing charge larger than the balance fails with FAILED_PRECONDITION and
  // reason INSUFFICIENT_CREDITS.
  try {
    await credits.consume({
      accountId: account,
      feature: "text",
      amount: 1_000_000n,
      requestId: randomUUID(),
    });
    throw new Error("an overdraft was accepted");
  } catch (err) {
    const e = ConnectError.from(err);
    if (e.code !== Code.FailedPrecondition || reason(e) !== "INSUFFICIENT_CREDITS") throw err;
    console.log(`overdraft refused: ${Code[e.code]}, reason ${reason(e)}`);
  }

  // An invalid request fails with INVALID_ARGUMENT, reason INVALID_REQUEST, and a
  // google.rpc.BadRequest naming each offending field and why.
  try {
    await credits.grant({ accountId: account, amount: 0n, requestId: randomUUID() });
    throw new Error("a grant of 0 credits was accepted");
  } catch (err) {
    const e = ConnectError.from(err);
    const { info, badRequest } = statusDetails(e);
    const violations = badRequest?.fieldViolations ?? [];
    if (
      e.code !== Code.InvalidArgument ||
      info?.reason !== "INVALID_REQUEST" ||
      !violations.some((v) => v.field === "amount")
    ) {
      throw err;
    }
    console.log(
      `invalid grant refused: ${Code[e.code]}, reason ${info.reason}, field violations: ` +
        violations.map((v) => `${v.field} (${v.description})`).join(", "),
    );
  }

  const transactions = await history(2);
  console.log(`history of ${account}, newest first:`);
  for (const t of transactions) {
    const when = t.createTime ? timestampDate(t.createTime).toISOString() : "?";
    console.log(
      `  ${when} ${TransactionKind[t.kind]} ${t.feature || "-"} ` +
        `amount ${t.amount} balance ${t.balance}`,
    );
  }
  if (!transactions.some((t) => t.transactionId === consumed.transactionId)) {
    throw new Error(`the consume ${consumed.transactionId} is missing from the history`);
  }

  await meterVoiceCall();
  await checkAndLimit();
  await creditLineAndRecharge();

  const balance = await credits.getBalance({ accountId: account });
  console.log(`final balance of ${account}: ${balance.balance}`);
  console.log("node example: OK");
}

main().catch((err: unknown) => {
  const e = ConnectError.from(err);
  console.error(`node example FAILED: ${Code[e.code]}: ${e.rawMessage} ${reason(e)}`);
  process.exit(1);
});
