<?php
// creditmeter from PHP over HTTP/JSON (`creditmeter serve --http-listen HOST:PORT`, the
// Connect protocol): grant credits, consume a text message, handle a refused overdraft
// (INSUFFICIENT_CREDITS) and an invalid request, read the account's history, and meter a
// voice call (StartSession -> UpdateSession -> EndSession). Plain curl: no gRPC extension,
// no generated code; Debian's php-cli and php-curl.
//
//   CREDITMETER_HTTP_SERVER=http://127.0.0.1:8080 CREDITMETER_API_KEY=cm_... php example.php
//
// The key must be an admin key (Grant needs one). Exits 0 when every call behaved as the
// API documents.
declare(strict_types=1);

$server = rtrim(getenv('CREDITMETER_HTTP_SERVER') ?: 'http://127.0.0.1:8080', '/');
$apiKey = getenv('CREDITMETER_API_KEY');
if (!$apiKey) {
    fwrite(STDERR, "set CREDITMETER_API_KEY to an admin key (creditmeter keys create --role admin)\n");
    exit(2);
}

/** A refused call: the Connect error code, message, and the google.rpc details. */
final class CreditmeterError extends RuntimeException
{
    public function __construct(
        public readonly int $httpStatus,
        public readonly string $connectCode,
        string $message,
        /** ErrorInfo.reason, e.g. INSUFFICIENT_CREDITS */
        public readonly string $reason = '',
        /** ErrorInfo.metadata */
        public readonly array $metadata = [],
        /** BadRequest field violations: field => description */
        public readonly array $violations = [],
    ) {
        parent::__construct($message);
    }

    /** The code as gRPC libraries spell it: failed_precondition -> FailedPrecondition. */
    public function codeName(): string
    {
        return str_replace(' ', '', ucwords(str_replace('_', ' ', $this->connectCode)));
    }
}

/**
 * One unary RPC: POST {server}/credits.v1.{Service}/{Method} with a JSON body, as the
 * Connect protocol has it. Fields are the proto's JSON names (lowerCamelCase); 64-bit
 * integers are JSON strings; fields at their zero value are left out of answers.
 */
function rpc(string $method, array $request, string $service = 'Credits'): array
{
    global $server, $apiKey;
    $curl = curl_init("$server/credits.v1.$service/$method");
    curl_setopt_array($curl, [
        CURLOPT_POST => true,
        CURLOPT_POSTFIELDS => json_encode((object) $request, JSON_THROW_ON_ERROR),
        CURLOPT_HTTPHEADER => [
            'Content-Type: application/json',
            "Authorization: Bearer $apiKey",
            'Connect-Protocol-Version: 1',
            'Connect-Timeout-Ms: 10000',
        ],
        CURLOPT_RETURNTRANSFER => true,
        CURLOPT_TIMEOUT => 15,
    ]);
    $body = curl_exec($curl);
    if ($body === false) {
        throw new RuntimeException("$method: " . curl_error($curl));
    }
    $status = curl_getinfo($curl, CURLINFO_RESPONSE_CODE);
    curl_close($curl);
    $answer = $body === '' ? [] : json_decode($body, true, 512, JSON_THROW_ON_ERROR);
    if ($status === 200) {
        return $answer;
    }
    // A Connect error: {"code", "message", "details": [{"type", "value", "debug"}]}. Each
    // detail is a base64 protobuf message of `type`; `debug` is the same in JSON.
    $reason = '';
    $metadata = [];
    $violations = [];
    foreach ($answer['details'] ?? [] as $detail) {
        $debug = $detail['debug'] ?? [];
        if ($detail['type'] === 'google.rpc.ErrorInfo') {
            $reason = $debug['reason'] ?? '';
            $metadata = $debug['metadata'] ?? [];
        } elseif ($detail['type'] === 'google.rpc.BadRequest') {
            foreach ($debug['fieldViolations'] ?? [] as $v) {
                $violations[$v['field']] = $v['description'];
            }
        }
    }
    throw new CreditmeterError(
        $status, $answer['code'] ?? 'unknown', $answer['message'] ?? '', $reason, $metadata,
        $violations,
    );
}

function uuid(): string
{
    $b = random_bytes(16);
    $b[6] = chr((ord($b[6]) & 0x0f) | 0x40);
    $b[8] = chr((ord($b[8]) & 0x3f) | 0x80);
    return vsprintf('%s%s-%s-%s-%s-%s%s%s', str_split(bin2hex($b), 4));
}

$account = 'example-' . substr(uuid(), 0, 8);

$granted = rpc('Grant', ['accountId' => $account, 'amount' => '1000', 'requestId' => uuid()]);
echo "granted {$granted['lot']['amount']} credits to $account: balance {$granted['balance']}\n";

// The request id makes a retry safe: the same id and parameters answer the first result
// and change nothing (a network error on the way back is retried with the same id).
$consumeId = uuid();
$consume = ['accountId' => $account, 'feature' => 'text', 'quantity' => '1', 'requestId' => $consumeId];
$consumed = rpc('Consume', $consume);
$replayed = rpc('Consume', $consume);
if ($replayed['transactionId'] !== $consumed['transactionId'] || $replayed['balance'] !== $consumed['balance']) {
    throw new RuntimeException('a retried consume was charged twice');
}
echo "consumed {$consumed['amount']} credits for {$consumed['units']} text message(s) "
    . "(transaction {$consumed['transactionId']}): balance {$consumed['balance']}\n";

// An all-or-nothing charge larger than the balance is refused: failed_precondition
// (HTTP 400) with ErrorInfo reason INSUFFICIENT_CREDITS, and nothing is taken.
try {
    rpc('Consume', ['accountId' => $account, 'feature' => 'text', 'amount' => '1000000', 'requestId' => uuid()]);
    throw new RuntimeException('an overdraft was accepted');
} catch (CreditmeterError $e) {
    if ($e->connectCode !== 'failed_precondition' || $e->reason !== 'INSUFFICIENT_CREDITS') {
        throw $e;
    }
    echo "overdraft refused: {$e->codeName()}, reason {$e->reason}\n";
}

// An invalid request: invalid_argument, reason INVALID_REQUEST, and a BadRequest naming
// each offending field and why.
try {
    rpc('Grant', ['accountId' => $account, 'amount' => '0', 'requestId' => uuid()]);
    throw new RuntimeException('a grant of 0 credits was accepted');
} catch (CreditmeterError $e) {
    if ($e->connectCode !== 'invalid_argument' || $e->reason !== 'INVALID_REQUEST' || !isset($e->violations['amount'])) {
        throw $e;
    }
    $fields = implode(', ', array_map(
        fn ($f, $d) => "$f ($d)", array_keys($e->violations), $e->violations,
    ));
    echo "invalid grant refused: {$e->codeName()}, reason {$e->reason}, field violations: $fields\n";
}

// History comes from the durable ledger, which trails the balance by the flush lag
// (normally well under a second): poll briefly until the consume shows up.
$deadline = microtime(true) + 10;
do {
    $page = rpc('ListTransactions', ['accountId' => $account, 'pageSize' => 10]);
    $transactions = $page['transactions'] ?? [];
    if (count($transactions) >= 2) {
        break;
    }
    usleep(200_000);
} while (microtime(true) < $deadline);
echo "history of $account, newest first:\n";
$seen = false;
foreach ($transactions as $t) {
    $kind = preg_replace('/^TRANSACTION_KIND_/', '', $t['kind']);
    $feature = ($t['feature'] ?? '') ?: '-';
    echo "  {$t['createTime']} $kind $feature amount {$t['amount']} balance " . ($t['balance'] ?? '0') . "\n";
    $seen = $seen || $t['transactionId'] === $consumed['transactionId'];
}
if (!$seen) {
    throw new RuntimeException("the consume {$consumed['transactionId']} is missing from the history");
}

// A voice call: reserve 60 s, report 45 s used, end after 65 s in all.
$sessionId = 'call-' . uuid();
$started = rpc('StartSession', [
    'accountId' => $account, 'feature' => 'voice', 'sessionId' => $sessionId,
    'requestedSeconds' => '60',
]);
echo "voice session $sessionId started: {$started['grantedSeconds']}s granted, balance {$started['balance']}\n";
$updated = rpc('UpdateSession', [
    'accountId' => $account, 'sessionId' => $sessionId, 'sequence' => '1', 'usedSeconds' => '45',
]);
echo 'voice session updated: charged ' . ($updated['chargedAmount'] ?? '0')
    . ", {$updated['grantedSeconds']}s granted, balance {$updated['balance']}\n";
$ended = rpc('EndSession', [
    'accountId' => $account, 'sessionId' => $sessionId, 'sequence' => '2', 'usedSeconds' => '20',
]);
echo 'voice session ended: charged ' . ($ended['chargedAmount'] ?? '0') . ', released '
    . ($ended['releasedAmount'] ?? '0') . ', total charged ' . ($ended['session']['chargedAmount'] ?? '0')
    . ", balance {$ended['balance']}\n";

$balance = rpc('GetBalance', ['accountId' => $account]);
echo "final balance of $account: " . ($balance['balance'] ?? '0') . "\n";
echo "php example: OK\n";
