package integration

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/shadow"
	"github.com/shadowctl/shadowctl/sync"
)

// readyLogical submits a logical-sync migration of table and drives it to
// ready. No process reads the slot afterwards, so blue's later changes wait
// in it until applyBacklog.
func (db *testDB) readyLogical(table, alter string) *shadow.Migration {
	db.t.Helper()
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: table, Alter: alter, Sync: shadow.SyncLogical})
	if err != nil {
		db.t.Fatal(err)
	}
	// Removes the slot whatever the test did (a no-op once aborted).
	db.t.Cleanup(func() { _ = db.Runner.Abort(context.WithoutCancel(ctx), m.ID, "") })
	if m, err = db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil {
		db.t.Fatal(err)
	}
	return m
}

// applyBacklog marks the end of the WAL, runs a follower until green has
// applied everything before the mark, stops it and returns how long the
// apply took (from the follower's start).
func (db *testDB) applyBacklog(id string) time.Duration {
	db.t.Helper()
	ctx := context.Background()
	mark := scalar[string](db, `SELECT pg_logical_emit_message(true, $1, 'test')::text`, sync.MarkerPrefix)
	fctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- db.Runner.Follow(fctx, id) }()
	for {
		var ok bool
		if err := db.Pool.QueryRow(ctx, `SELECT applied_lsn >= $2::text::pg_lsn FROM shadowctl.sync_positions WHERE migration_id = $1`, id, mark).Scan(&ok); err != nil {
			stop()
			db.t.Fatal(err)
		}
		if ok {
			break
		}
		select {
		case err := <-done: // the follower gave up (or failed the migration)
			stop()
			db.t.Fatalf("the follower stopped before applying up to %s: %v", mark, err)
		case <-time.After(5 * time.Millisecond): // poll interval
		}
	}
	took := time.Since(start)
	stop()
	<-done
	return took
}

// BenchmarkLogicalApply measures how fast the applier drains a backlog: it
// writes N row changes to blue while nothing reads the slot (pgbench-like
// transactions of one INSERT and two UPDATEs, with DELETEs, key changes and
// a few large transactions mixed in), then times a follower applying them and
// reports changes/s. N is SHADOWCTL_APPLY_CHANGES (default 200,000). The time
// includes the WAL sender's decoding, as in a real drain. Run it alone, e.g.
//
//	go test -run '^$' -bench LogicalApply -benchtime 1x ./integration/
func BenchmarkLogicalApply(b *testing.B) {
	target := 200000
	if s := os.Getenv("SHADOWCTL_APPLY_CHANGES"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			b.Fatalf("SHADOWCTL_APPLY_CHANGES: %v", err)
		}
		target = n
	}
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		db := newTestDB(b)
		const rows = 100000
		db.createOrders(rows)
		m := db.readyLogical("orders", "ALTER COLUMN amount TYPE numeric(12,2)")
		// Each loop turn is one transaction; its changes are counted exactly
		// (every statement below hits existing rows only).
		var changes int
		txns := 0
		for changes < target {
			txns++
			changes += 3
			if txns%5 == 0 {
				changes++
			}
			if txns%100 == 50 {
				changes++
			}
			if txns%1000 == 0 {
				changes += 500
			}
		}
		start := time.Now()
		db.exec(fmt.Sprintf(`DO $$
DECLARE base int := (SELECT max(id) FROM orders);
BEGIN
  FOR i IN 1..%d LOOP
    INSERT INTO orders (customer_id, customer_name, amount, status) VALUES (1 + i %% 1000, 'customer ' || (1 + i %% 1000), i / 3.0, 'new');
    UPDATE orders SET status = 'paid', amount = amount + 1 WHERE id = 1 + (i::bigint * 7919) %% %[2]d;
    UPDATE orders SET status = 'shipped' WHERE id = 1 + (i::bigint * 104729) %% %[2]d;
    -- Deleted rows were inserted by turns = 2 (mod 5), re-keyed ones by turns = 3 (mod 5).
    IF i %% 5 = 0 THEN DELETE FROM orders WHERE id = base + i - 3; END IF;
    IF i %% 100 = 50 THEN UPDATE orders SET id = -id WHERE id = base + i - 2; END IF;
    IF i %% 1000 = 0 THEN UPDATE orders SET status = 'bulk ' || i WHERE id BETWEEN i %% %[2]d + 1 AND i %% %[2]d + 500; END IF;
    COMMIT;
  END LOOP;
END $$`, txns, rows))
		b.Logf("wrote %d changes in %d transactions in %s", changes, txns, time.Since(start).Round(time.Millisecond))
		b.StartTimer()
		took := db.applyBacklog(m.ID)
		b.StopTimer()
		b.ReportMetric(float64(changes)/took.Seconds(), "changes/s")
		b.Logf("applied %d changes in %s: %.0f changes/s", changes, took.Round(time.Millisecond), float64(changes)/took.Seconds())
		db.assertGreenMatches(`SELECT id, customer_id, customer_name, amount::numeric(12,2), status, created_at FROM public.orders`,
			`SELECT id, customer_id, customer_name, amount, status, created_at FROM green.orders`)
		if err := db.Runner.Abort(context.Background(), m.ID, ""); err != nil {
			b.Fatal(err)
		}
	}
}
