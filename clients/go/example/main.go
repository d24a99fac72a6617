// Command example uses creditmeter from Go: grant credits, consume a text message, read
// the account's history, meter a voice call (StartSession -> UpdateSession -> EndSession),
// check before use, cap a feature with a daily usage limit, open a credit line and set a
// recharge threshold; on the way, decode the google.rpc error details of a refused
// overdraft, of an invalid request and of a passed usage limit.
//
//	CREDITMETER_SERVER=127.0.0.1:50051 CREDITMETER_API_KEY=cm_... ./example
//
// The key must be an admin key (Grant needs one). Exits 0 when every call behaved as the
// API documents.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"strings"
	"time"

	creditsv1 "github.com/creditmeter/creditmeter/clients/go/credits/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

func newID(prefix string) string {
	b := make([]byte, 8)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return prefix + hex.EncodeToString(b)
}

// details returns the google.rpc.ErrorInfo the server attaches to every error (AIP-193)
// and the google.rpc.BadRequest it adds for an invalid request. grpc-go's status package
// decodes the grpc-status-details-bin trailer (a google.rpc.Status) and unpacks each Any
// detail into the genproto type its URL names, here errdetails.ErrorInfo and BadRequest;
// so Go needs no code generated from proto/google/rpc.
func details(err error) (*errdetails.ErrorInfo, *errdetails.BadRequest) {
	var info *errdetails.ErrorInfo
	var bad *errdetails.BadRequest
	for _, d := range status.Convert(err).Details() {
		switch d := d.(type) {
		case *errdetails.ErrorInfo:
			info = d
		case *errdetails.BadRequest:
			bad = d
		}
	}
	return info, bad
}

// reason is the ErrorInfo reason of an error ("" for none).
func reason(err error) string {
	info, _ := details(err)
	return info.GetReason()
}

func main() {
	server := os.Getenv("CREDITMETER_SERVER")
	if server == "" {
		server = "127.0.0.1:50051"
	}
	apiKey := os.Getenv("CREDITMETER_API_KEY")
	if apiKey == "" {
		fmt.Fprintln(os.Stderr, "set CREDITMETER_API_KEY to an admin key (creditmeter keys create --role admin)")
		os.Exit(2)
	}
	if err := run(server, apiKey); err != nil {
		fmt.Fprintf(os.Stderr, "go example FAILED: %v\n", err)
		os.Exit(1)
	}
	fmt.Println("go example: OK")
}

func run(server, apiKey string) error {
	// The server speaks gRPC over plaintext HTTP/2 (put TLS in front of it in production
	// and use transport credentials here). WithInsecure rather than the newer
	// credentials/insecure package, which Debian's grpc-go (1.33) does not have yet.
	conn, err := grpc.Dial(server, grpc.WithInsecure())
	if err != nil {
		return err
	}
	defer conn.Close()
	credits := creditsv1.NewCreditsClient(conn)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Every RPC carries the key as `authorization: Bearer <key>` metadata.
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+apiKey)
	account := newID("example-go-")

	granted, err := credits.Grant(ctx, &creditsv1.GrantRequest{
		AccountId: account, Amount: 1000, RequestId: newID("req-"),
	})
	if err != nil {
		return fmt.Errorf("grant: %w", err)
	}
	fmt.Printf("granted %d credits to %s: balance %d\n", granted.GetLot().GetAmount(), account, granted.GetBalance())

	consumed, err := credits.Consume(ctx, &creditsv1.ConsumeRequest{
		AccountId: account, Feature: "text", Quantity: proto.Int64(1), RequestId: newID("req-"),
	})
	if err != nil {
		return fmt.Errorf("consume: %w", err)
	}
	fmt.Printf("consumed %d credits for %d text message(s) (transaction %s): balance %d\n",
		consumed.GetAmount(), consumed.GetUnits(), consumed.GetTransactionId(), consumed.GetBalance())

	// An all-or-nothing charge larger than the balance fails with FAILED_PRECONDITION and
	// reason INSUFFICIENT_CREDITS.
	_, err = credits.Consume(ctx, &creditsv1.ConsumeRequest{
		AccountId: account, Feature: "text", Amount: proto.Int64(1_000_000), RequestId: newID("req-"),
	})
	if status.Code(err) != codes.FailedPrecondition || reason(err) != "INSUFFICIENT_CREDITS" {
		return fmt.Errorf("overdraft: want FAILED_PRECONDITION / INSUFFICIENT_CREDITS, got %v", err)
	}
	fmt.Printf("overdraft refused: %s, reason %s\n", status.Code(err), reason(err))

	// An invalid request fails with INVALID_ARGUMENT, reason INVALID_REQUEST, and a
	// google.rpc.BadRequest naming each offending field and why.
	_, err = credits.Grant(ctx, &creditsv1.GrantRequest{AccountId: account, Amount: 0, RequestId: newID("req-")})
	info, bad := details(err)
	var violations []string
	amountNamed := false
	for _, v := range bad.GetFieldViolations() {
		violations = append(violations, fmt.Sprintf("%s (%s)", v.GetField(), v.GetDescription()))
		amountNamed = amountNamed || v.GetField() == "amount"
	}
	if status.Code(err) != codes.InvalidArgument || info.GetReason() != "INVALID_REQUEST" || !amountNamed {
		return fmt.Errorf("invalid grant: want INVALID_ARGUMENT / INVALID_REQUEST naming amount, got %v", err)
	}
	fmt.Printf("invalid grant refused: %s, reason %s, field violations: %s\n",
		status.Code(err), info.GetReason(), strings.Join(violations, ", "))

	// History comes from the durable ledger, which trails the balance by the flush lag
	// (normally well under a second): poll briefly until the consume shows up.
	var history []*creditsv1.Transaction
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		page, err := credits.ListTransactions(ctx, &creditsv1.ListTransactionsRequest{AccountId: account, PageSize: 10})
		if err != nil {
			return fmt.Errorf("list transactions: %w", err)
		}
		history = page.GetTransactions()
		if len(history) >= 2 || time.Now().After(deadline) {
			break
		}
	}
	fmt.Printf("history of %s, newest first:\n", account)
	found := false
	for _, t := range history {
		feature := t.GetFeature()
		if feature == "" {
			feature = "-"
		}
		fmt.Printf("  %s %s %s amount %d balance %d\n", t.GetCreateTime().AsTime().Format(time.RFC3339Nano),
			t.GetKind(), feature, t.GetAmount(), t.GetBalance())
		found = found || t.GetTransactionId() == consumed.GetTransactionId()
	}
	if !found {
		return fmt.Errorf("the consume %s is missing from the history", consumed.GetTransactionId())
	}

	if err := meterVoiceCall(ctx, credits, account); err != nil {
		return err
	}
	if err := checkAndLimit(ctx, credits, account); err != nil {
		return err
	}
	if err := creditLineAndRecharge(ctx, credits, account); err != nil {
		return err
	}

	balance, err := credits.GetBalance(ctx, &creditsv1.GetBalanceRequest{AccountId: account})
	if err != nil {
		return fmt.Errorf("get balance: %w", err)
	}
	fmt.Printf("final balance of %s: %d\n", account, balance.GetBalance())
	return nil
}

func meterVoiceCall(ctx context.Context, credits creditsv1.CreditsClient, account string) error {
	sessionID := newID("call-")
	err := func() error {
		started, err := credits.StartSession(ctx, &creditsv1.StartSessionRequest{
			AccountId: account, Feature: "voice", SessionId: sessionID, RequestedSeconds: proto.Int64(60),
		})
		if err != nil {
			return err
		}
		fmt.Printf("voice session %s started: %ds granted, balance %d\n", sessionID, started.GetGrantedSeconds(), started.GetBalance())
		updated, err := credits.UpdateSession(ctx, &creditsv1.UpdateSessionRequest{
			AccountId: account, SessionId: sessionID, Sequence: 1, UsedSeconds: 45,
		})
		if err != nil {
			return err
		}
		fmt.Printf("voice session updated: charged %d, %ds granted, balance %d\n",
			updated.GetChargedAmount(), updated.GetGrantedSeconds(), updated.GetBalance())
		ended, err := credits.EndSession(ctx, &creditsv1.EndSessionRequest{
			AccountId: account, SessionId: sessionID, Sequence: 2, UsedSeconds: 20,
		})
		if err != nil {
			return err
		}
		fmt.Printf("voice session ended: charged %d, released %d, total charged %d, balance %d\n",
			ended.GetChargedAmount(), ended.GetReleasedAmount(), ended.GetSession().GetChargedAmount(), ended.GetBalance())
		return nil
	}()
	if err != nil {
		return fmt.Errorf("voice session: %w", err)
	}
	return nil
}

// checkAndLimit asks Check what Consume would decide (changing nothing), then caps text
// messages at 2 a day for an account of its own: the third fails with FAILED_PRECONDITION
// and reason USAGE_LIMIT_EXCEEDED, whose metadata says the limit, the usage and when the
// period ends.
func checkAndLimit(ctx context.Context, credits creditsv1.CreditsClient, account string) error {
	price, err := credits.Check(ctx, &creditsv1.CheckRequest{AccountId: account, Feature: "voice", Quantity: proto.Int64(90)})
	if err != nil {
		return fmt.Errorf("check: %w", err)
	}
	fmt.Printf("check: 90 s of voice allowed=%t, would cost %d credits (%d increments), balance %d\n",
		price.GetAllowed(), price.GetAmount(), price.GetUnits(), price.GetBalance())
	capped := account + "-capped"
	if _, err := credits.Grant(ctx, &creditsv1.GrantRequest{AccountId: capped, Amount: 100, RequestId: newID("req-")}); err != nil {
		return fmt.Errorf("grant: %w", err)
	}
	_, err = credits.SetUsageLimit(ctx, &creditsv1.SetUsageLimitRequest{
		AccountId: capped,
		Limit: &creditsv1.UsageLimit{
			Feature: "text", Period: creditsv1.UsageLimitPeriod_USAGE_LIMIT_PERIOD_DAY,
			Limit: 2, Unit: creditsv1.UsageLimitUnit_USAGE_LIMIT_UNIT_UNITS,
		},
		RequestId: newID("req-"),
	})
	if err != nil {
		return fmt.Errorf("set usage limit: %w", err)
	}
	if _, err := credits.Consume(ctx, &creditsv1.ConsumeRequest{
		AccountId: capped, Feature: "text", Quantity: proto.Int64(2), RequestId: newID("req-"),
	}); err != nil {
		return fmt.Errorf("consume within the limit: %w", err)
	}
	denied, err := credits.Check(ctx, &creditsv1.CheckRequest{AccountId: capped, Feature: "text"})
	if err != nil || denied.GetAllowed() || denied.GetDenial().GetReason() != "USAGE_LIMIT_EXCEEDED" {
		return fmt.Errorf("check past the limit: got %v, %v", denied, err)
	}
	_, err = credits.Consume(ctx, &creditsv1.ConsumeRequest{AccountId: capped, Feature: "text", RequestId: newID("req-")})
	info, _ := details(err)
	if status.Code(err) != codes.FailedPrecondition || info.GetReason() != "USAGE_LIMIT_EXCEEDED" {
		return fmt.Errorf("past the limit: want FAILED_PRECONDITION / USAGE_LIMIT_EXCEEDED, got %v", err)
	}
	m := info.GetMetadata()
	fmt.Printf("usage limit refused the 3rd text: %s/%s %s this %s, resets %s\n",
		m["used"], m["limit"], m["unit"], m["period"], m["period_end"])
	listed, err := credits.ListUsageLimits(ctx, &creditsv1.ListUsageLimitsRequest{AccountId: capped})
	if err != nil {
		return fmt.Errorf("list usage limits: %w", err)
	}
	if l := listed.GetLimits(); len(l) != 1 || l[0].GetUsed() != 2 || l[0].GetRemaining() != 0 {
		return fmt.Errorf("ListUsageLimits answered %v", l)
	}
	return nil
}

// creditLineAndRecharge opens a credit line (charges may take the balance down to
// -overdraft_limit; the part past the lots is debt, which the next grant repays first) and
// sets a recharge threshold (each fall below it records one recharge_due and, with a pack,
// creates a pending purchase).
func creditLineAndRecharge(ctx context.Context, credits creditsv1.CreditsClient, account string) error {
	owing := account + "-owing"
	if _, err := credits.Grant(ctx, &creditsv1.GrantRequest{AccountId: owing, Amount: 10, RequestId: newID("req-")}); err != nil {
		return fmt.Errorf("grant: %w", err)
	}
	if _, err := credits.SetAccountOptions(ctx, &creditsv1.SetAccountOptionsRequest{
		AccountId: owing, OverdraftLimit: proto.Int64(50), RequestId: newID("req-"),
	}); err != nil {
		return fmt.Errorf("set account options: %w", err)
	}
	if _, err := credits.SetRechargePolicy(ctx, &creditsv1.SetRechargePolicyRequest{
		AccountId: owing, Policy: &creditsv1.RechargePolicy{Threshold: 5}, RequestId: newID("req-"),
	}); err != nil {
		return fmt.Errorf("set recharge policy: %w", err)
	}
	if _, err := credits.Consume(ctx, &creditsv1.ConsumeRequest{
		AccountId: owing, Feature: "text", Amount: proto.Int64(30), RequestId: newID("req-"),
	}); err != nil {
		return fmt.Errorf("consume into debt: %w", err)
	}
	owed, err := credits.GetBalance(ctx, &creditsv1.GetBalanceRequest{AccountId: owing})
	if err != nil || owed.GetBalance() != 0 || owed.GetDebt() != 20 {
		return fmt.Errorf("after charging 30 of 10: %v, %v", owed, err)
	}
	if _, err := credits.Grant(ctx, &creditsv1.GrantRequest{AccountId: owing, Amount: 25, RequestId: newID("req-")}); err != nil {
		return fmt.Errorf("grant: %w", err)
	}
	repaid, err := credits.GetBalance(ctx, &creditsv1.GetBalanceRequest{AccountId: owing})
	if err != nil {
		return fmt.Errorf("get balance: %w", err)
	}
	fmt.Printf("credit line: charged 30 of a balance of 10 (debt 20); a grant of 25 repaid it: balance %d, debt %d\n",
		repaid.GetBalance(), repaid.GetDebt())
	recharge, err := credits.GetRechargePolicy(ctx, &creditsv1.GetRechargePolicyRequest{AccountId: owing})
	if err != nil {
		return fmt.Errorf("get recharge policy: %w", err)
	}
	fmt.Printf("recharge policy of %s: below %d credits\n", owing, recharge.GetPolicy().GetThreshold())
	return nil
}
