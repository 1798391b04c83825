package integration

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/cutover"
	"github.com/shadowctl/shadowctl/shadow"
)

// A logical cutover holds blue's lock while green applies the last changes.
// When the apply cannot go on (here a session holds one of green's rows), the
// attempt lets the lock go after --max-cutover-stall and tries again, so the
// application's writes to blue wait about that long at most; at the deadline
// the cutover gives up with blue still serving, and once green's row is free
// it goes through.
func TestLogicalCutoverStallIsBounded(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(1000)
	ctx := context.Background()
	m := db.ready(shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)", Sync: shadow.SyncLogical})
	fctx, stopFollow := context.WithCancel(ctx)
	followed := make(chan error, 1)
	go func() { followed <- db.Runner.Follow(fctx, m.ID) }()
	defer func() { stopFollow(); <-followed }()
	conn := func() *pgx.Conn {
		c, err := pgx.Connect(ctx, db.DSN)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close(context.Background()) })
		return c
	}
	// X holds green's row 7; the application's transaction A changes blue's
	// row 7 and stays open, so the swap queues behind it.
	x, a := conn(), conn()
	for _, s := range []string{`BEGIN`, `SELECT 1 FROM green.orders WHERE id = 7 FOR UPDATE`} {
		if _, err := x.Exec(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range []string{`BEGIN`, `UPDATE orders SET status = 'held' WHERE id = 7`} {
		if _, err := a.Exec(ctx, s); err != nil {
			t.Fatal(err)
		}
	}
	const stall = 300 * time.Millisecond
	cut := make(chan error, 1)
	go func() {
		_, err := db.Runner.Cutover(ctx, m.ID, shadow.CutoverOptions{LockTimeout: 2 * time.Second, MaxCutoverStall: stall, Deadline: 3 * time.Second})
		cut <- err
	}()
	waitTrue(t, 30*time.Second, "the swap to queue for blue's lock", func() bool {
		return scalar[bool](db, `SELECT EXISTS (SELECT 1 FROM pg_locks WHERE relation = 'public.orders'::regclass AND NOT granted)`)
	})
	// A commits: its change to row 7 reaches the stream after the drain, and
	// the apply, under the swap's lock, waits for X.
	if _, err := a.Exec(ctx, `COMMIT`); err != nil {
		t.Fatal(err)
	}
	// The application keeps writing other rows of blue meanwhile.
	var worst time.Duration
	var writes int
	probe := conn()
	var err2 error
	for done := false; !done; {
		select {
		case err2 = <-cut:
			done = true
		default:
			start := time.Now()
			if _, err := probe.Exec(ctx, `UPDATE orders SET status = 'probe' WHERE id = 500`); err != nil {
				t.Fatal(err)
			}
			worst, writes = max(worst, time.Since(start)), writes+1
		}
	}
	if !errors.Is(err2, cutover.ErrDeadline) {
		t.Fatalf("cutover with green's apply held: %v, want ErrDeadline", err2)
	}
	if kind := scalar[string](db, `SELECT relkind::text FROM pg_class WHERE oid = 'public.orders'::regclass`); kind != "r" {
		t.Fatalf("public.orders is relkind %s after the failed cutover, want blue's table", kind)
	}
	if ph := db.migration(m.ID).Phase; ph != shadow.Ready {
		t.Fatalf("phase %s after the failed cutover, want ready", ph)
	}
	// The budget, plus the swap's statements and a loaded machine's delays;
	// without the budget the write waited a minute.
	if worst > stall+time.Second {
		t.Fatalf("an application write waited %s during the cutover's attempts (stall budget %s)", worst.Round(time.Millisecond), stall)
	}
	t.Logf("%d application writes during the attempts, the slowest %s", writes, worst.Round(time.Millisecond))

	// Green's row is free: the cutover goes through, with A's change.
	if _, err := x.Exec(ctx, `ROLLBACK`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Runner.Cutover(ctx, m.ID, shadow.CutoverOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := scalar[string](db, `SELECT status FROM green.orders WHERE id = 7`); got != "held" {
		t.Fatalf("green's row 7 has status %q after the cutover, want A's 'held'", got)
	}
}
