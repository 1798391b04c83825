package integration

import (
	"context"
	"testing"

	"github.com/shadowctl/shadowctl/shadow"
)

func TestStartToReadyIdle(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(30000)
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{
		Table: "orders",
		Alter: "ALTER COLUMN amount TYPE numeric(12,2), ADD COLUMN customer_email text",
		Map:   map[string]string{"customer_email": "(SELECT email FROM customers c WHERE c.id = customer_id)"},
	})
	if err != nil {
		t.Fatal(err)
	}
	m, err = db.Runner.Drive(ctx, m.ID, shadow.Ready)
	if err != nil {
		t.Fatal(err)
	}
	if m.Phase != shadow.Ready {
		t.Fatalf("phase %s", m.Phase)
	}
	db.assertGreenMatches(
		`SELECT id, customer_id, customer_name, amount::numeric(12,2), status, created_at, (SELECT email FROM customers c WHERE c.id = customer_id) FROM public.orders`,
		`SELECT id, customer_id, customer_name, amount, status, created_at, customer_email FROM green.orders`)
	if n := scalar[int](db, `SELECT count(*) FROM pg_indexes WHERE schemaname = 'green' AND tablename = 'orders'`); n != 3 {
		t.Fatalf("green has %d indexes, want 3", n)
	}
}

// Issue 3, done-when 1: a workload of 4 clients runs through public.orders
// for the whole start → ready with zero errors; at ready green equals the
// mapping of blue row for row.
func TestStartUnderWorkloadEndsExact(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(60000)
	ctx := context.Background()
	w := startWorkload(t, db.DSN, 4)
	w.waitRunning()
	m, err := db.Runner.Submit(ctx, shadow.Request{
		Table: "public.orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2), ALTER COLUMN id TYPE bigint", BatchSize: 2000,
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil {
		t.Fatal(err)
	}
	w.waitOps(200) // writes keep flowing at ready, through the sync
	w.stopAndCheck(t)
	db.assertGreenMatches(
		`SELECT id::bigint, customer_id, customer_name, amount::numeric(12,2), status, created_at FROM public.orders`,
		`SELECT id, customer_id, customer_name, amount, status, created_at FROM green.orders`)
}
