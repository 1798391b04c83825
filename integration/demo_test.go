package integration

import (
	"bytes"
	"context"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/integration/pgtest"
	"github.com/shadowctl/shadowctl/internal/demo"
)

// Issue 4, done-when 7 (the code path of `make demo`, small): the demo's
// scenario under its 4-client load ends with zero client errors, a final
// table equal to the load's model, nothing left behind, and the new column
// types.
func TestDemoScenario(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	var out bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	rep, err := demo.Run(ctx, demo.Config{
		Rows: 20000, Customers: 2000, Clients: 4,
		Soak: -1, SoakOps: 100, // synchronise on the load's progress, not on time
		DSN: dsn, Out: &out, Log: zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel),
	})
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, out.String())
	}
	if rep.Errors != 0 || rep.Ops == 0 {
		t.Fatalf("%d client errors in %d ops: %v", rep.Errors, rep.Ops, rep.ErrorSamples)
	}
	if !rep.Check.OK() {
		t.Fatalf("final state: %s", rep.Check.Summary())
	}
	if rep.Check.Rows < 20000-int64(rep.Check.Touched) {
		t.Fatalf("only %d rows checked", rep.Check.Rows)
	}
	if len(rep.Leftovers) > 0 {
		t.Fatalf("left behind: %v", rep.Leftovers)
	}
	if len(rep.Swaps) != 4 {
		t.Fatalf("%d swaps, want cutover, rollback, cutover, finalize", len(rep.Swaps))
	}
	for _, s := range rep.Swaps {
		if s.Attempts < 1 || s.LockHoldMS <= 0 || s.Load == nil {
			t.Fatalf("swap %s not measured: %+v", s.Kind, s)
		}
	}
	for _, want := range []string{"amount         | numeric(12,2)", "customer_email | text", `"orders_customer_id_idx" btree (customer_id)`, "REFERENCES customers(id)"} {
		if !strings.Contains(rep.Definition, want) {
			t.Fatalf("final definition lacks %q:\n%s", want, rep.Definition)
		}
	}
	if !strings.Contains(out.String(), "client errors: 0") {
		t.Fatalf("the report does not say zero client errors:\n%s", out.String())
	}
	t.Logf("demo: %d ops, 0 errors, %s", rep.Ops, rep.Check.Summary())
}

// The demo's verdict is only worth something if its check sees a difference:
// a changed, a deleted and an extra row are each reported.
func TestDemoCheckSeesDifferences(t *testing.T) {
	pool, dsn := pgtest.NewPool(t)
	ctx := context.Background()
	if err := demo.Seed(ctx, pool, 3000, 100); err != nil {
		t.Fatal(err)
	}
	load, err := demo.StartLoad(ctx, dsn, 4, 3000, 100)
	if err != nil {
		t.Fatal(err)
	}
	if err := load.WaitOps(ctx, 300); err != nil {
		t.Fatal(err)
	}
	load.Stop()
	if load.Errors() != 0 {
		t.Fatalf("load errors: %v", load.ErrorSamples())
	}
	res, err := load.Check(ctx, dsn, false)
	if err != nil {
		t.Fatal(err)
	}
	if !res.OK() {
		t.Fatalf("untouched table differs: %s", res.Summary())
	}
	var changed, deleted int64
	if err := pool.QueryRow(ctx, `SELECT min(id), max(id) FROM orders`).Scan(&changed, &deleted); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{
		`UPDATE orders SET amount = amount + 0.01 WHERE id = ` + itoa(changed),
		`DELETE FROM orders WHERE id = ` + itoa(deleted),
		`INSERT INTO orders (customer_id, customer_name, amount) VALUES (1, 'customer 1', 1)`,
	} {
		if _, err := pool.Exec(ctx, s); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
	}
	res, err = load.Check(ctx, dsn, false)
	if err != nil {
		t.Fatal(err)
	}
	if res.OK() || res.DiffCount != 3 {
		t.Fatalf("want 3 differences, got %d: %s", res.DiffCount, res.Summary())
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
