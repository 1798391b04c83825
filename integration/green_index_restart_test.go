package integration

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/shadow"
)

// A concurrent build of green's index that is cut short (the driver killed
// or interrupted while the build waits for older snapshots) leaves an
// INVALID index behind. Driving again drops it and builds it anew: every
// index of green valid, none twice, green equal to blue.
func TestInvalidGreenIndexIsRebuiltOnRestart(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(2000)
	ctx := context.Background()
	// An open snapshot (no table locked) that a concurrent build must wait for.
	snap, err := pgx.Connect(ctx, db.DSN)
	if err != nil {
		t.Fatal(err)
	}
	defer snap.Close(ctx)
	for _, s := range []string{`BEGIN ISOLATION LEVEL REPEATABLE READ`, `SELECT 1`} {
		if _, err := snap.Exec(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)"})
	if err != nil {
		t.Fatal(err)
	}
	dctx, interrupt := context.WithCancel(ctx)
	drove := make(chan error, 1)
	go func() { _, err := db.Runner.Drive(dctx, m.ID, shadow.Ready); drove <- err }()
	waitTrue(t, 60*time.Second, "a concurrent build of green's to wait, its index invalid", func() bool {
		return scalar[bool](db, `SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
			WHERE n.nspname = 'green' AND NOT i.indisvalid)
			AND EXISTS (SELECT 1 FROM pg_stat_activity WHERE query LIKE 'CREATE INDEX CONCURRENTLY%' AND wait_event_type = 'Lock')`)
	})
	interrupt()
	if err := <-drove; !errors.Is(err, context.Canceled) {
		t.Fatalf("drive: %v, want it interrupted", err)
	}
	if n := scalar[int](db, `SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = 'green' AND NOT i.indisvalid`); n == 0 {
		t.Fatal("no INVALID index left on green: the case tests nothing")
	}
	if _, err := snap.Exec(ctx, `COMMIT`); err != nil {
		t.Fatal(err)
	}
	if m, err = db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil || m.Phase != shadow.Ready {
		t.Fatalf("drive again: %v", err)
	}
	var all, valid int
	if err := db.Pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE i.indisvalid AND i.indisready)
		FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE n.nspname = 'green' AND c.relname = 'orders'`).Scan(&all, &valid); err != nil {
		t.Fatal(err)
	}
	blueIndexes := scalar[int](db, `SELECT count(*) FROM pg_index WHERE indrelid = 'public.orders'::regclass`)
	if all != blueIndexes || valid != all {
		t.Fatalf("green has %d indexes (%d valid), want blue's %d, all valid", all, valid, blueIndexes)
	}
	db.assertGreenMatches(`SELECT id, amount::numeric(12,2) FROM public.orders`, `SELECT id, amount FROM green.orders`)
	if err := db.Runner.Abort(ctx, m.ID, ""); err != nil {
		t.Fatal(err)
	}
}
