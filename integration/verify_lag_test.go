package integration

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/cutover"
	"github.com/shadowctl/shadowctl/shadow"
)

// With an asynchronous sync, chunks that differ only because green lags are
// compared again after a catch-up that serves many of them: ten lagging
// chunks cost two catch-ups, not ten, and none is taken for a mismatch. A
// difference the catch-ups do not remove is still reported, naming its
// chunk.
func TestVerifierSharesCatchUpsBetweenLaggingChunks(t *testing.T) {
	db := newTestDB(t)
	createItems(db, "items", 1000) // keys 2, 4, ..., 2000
	ctx := context.Background()
	m := db.ready(shadow.Request{Table: "items", Alter: "ALTER COLUMN n TYPE bigint"})
	db.exec(`ALTER TABLE green.items DISABLE TRIGGER ALL`)
	var catchUps atomic.Int64
	// The stand-in for the stream: a catch-up applies what green lacks.
	catchUp := func(ctx context.Context) error {
		catchUps.Add(1)
		_, err := db.Pool.Exec(ctx, `UPDATE green.items g SET v = b.v FROM public.items b WHERE g.id = b.id AND g.v <> b.v`)
		return err
	}
	verifier := func() *cutover.Verifier {
		return &cutover.Verifier{Pool: db.Pool, Mapping: m.State.Plan.Forward, ChunkRows: 100, Workers: 2, Chunked: true,
			CatchUp: catchUp, Log: zerolog.Nop()}
	}

	// One row behind in each of the first ten chunks (100 rows each).
	db.exec(`UPDATE green.items SET v = 'behind' WHERE id % 200 = 100`)
	res, err := verifier().Run(ctx)
	if err != nil || !res.OK || res.Chunks != 11 || res.Rows != 1000 || res.Mismatched != 0 {
		t.Fatalf("lagging green: %+v, %v; want 1000 rows in 11 chunks, no mismatch", res, err)
	}
	if n := catchUps.Load(); n != int64(res.CatchUps) || n < 1 || n > 2 {
		t.Fatalf("%d catch-ups (result says %d) for ten lagging chunks; want one or two shared ones", n, res.CatchUps)
	}
	db.assertGreenMatches(`SELECT id, v, n::bigint FROM public.items`, `SELECT id, v, n FROM green.items`)

	// A difference the stream does not explain: compared again after each
	// catch-up, then under the quiet lock, and reported.
	catchUps.Store(0)
	db.exec(`UPDATE green.items SET n = -1 WHERE id = 500`)
	res, err = verifier().Run(ctx)
	if !errors.Is(err, cutover.ErrMismatch) || res.Mismatched != 1 || !strings.Contains(res.FirstMismatch, "keys (400, 600]") {
		t.Fatalf("a real difference: %+v, %v; want ErrMismatch naming keys (400, 600]", res, err)
	}
	// Three shared catch-ups, then the quiet compare's two.
	if n := catchUps.Load(); n != 5 {
		t.Fatalf("%d catch-ups for one persistent difference; want 3 + 2 (quiet compare)", n)
	}
}

// The quiet compare holds blue's SHARE lock (the application's writes to
// blue wait) while it catches green up a last time; an apply that does not
// finish within LockedCatchUpBudget must not keep them waiting. Here the
// stand-in for the stream never finishes while blue is locked: each attempt
// lets the lock go after 300 ms, and a writer that queued behind it is
// through within about that.
func TestQuietCompareBoundsItsLockOnBlue(t *testing.T) {
	db := newTestDB(t)
	createItems(db, "items", 1000)
	ctx := context.Background()
	m := db.ready(shadow.Request{Table: "items", Alter: "ALTER COLUMN n TYPE bigint"})
	// A difference no catch-up removes, so the chunk goes to the quiet
	// compare.
	db.exec(`ALTER TABLE green.items DISABLE TRIGGER ALL`, `UPDATE green.items SET n = -1 WHERE id = 500`)
	locked := make(chan struct{}, 1)
	var lockedCatchUps atomic.Int64
	catchUp := func(ctx context.Context) error {
		var underLock bool
		if err := db.Pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_locks
			WHERE relation = 'public.items'::regclass AND mode = 'ShareLock' AND granted)`).Scan(&underLock); err != nil {
			return err
		}
		if !underLock {
			return nil
		}
		// A stalled apply: it returns only when told to stop.
		lockedCatchUps.Add(1)
		select {
		case locked <- struct{}{}:
		default:
		}
		<-ctx.Done()
		return ctx.Err()
	}
	v := &cutover.Verifier{Pool: db.Pool, Mapping: m.State.Plan.Forward, ChunkRows: 100, Workers: 1, Chunked: true,
		CatchUp: catchUp, LockedCatchUpBudget: 300 * time.Millisecond, Log: zerolog.Nop()}
	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	ran := make(chan error, 1)
	go func() { _, err := v.Run(runCtx); ran <- err }()

	select {
	case <-locked:
	case err := <-ran:
		t.Fatalf("verification ended before its quiet compare locked blue: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("the quiet compare never locked blue")
	}
	// Blue is SHARE-locked now, its catch-up stalled: a writer queues.
	started := time.Now()
	tx, err := db.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, `SET LOCAL statement_timeout = '5s'`); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `UPDATE public.items SET v = v WHERE id = 2`); err != nil {
		t.Fatalf("a writer to blue behind the quiet compare: %v (after %s)", err, time.Since(started).Round(time.Millisecond))
	}
	waited := time.Since(started)
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	if waited > 2*time.Second {
		t.Fatalf("a writer to blue waited %s behind the quiet compare; its catch-up budget is 300 ms", waited.Round(time.Millisecond))
	}
	// The compare keeps trying, letting the lock go each time.
	waitTrue(t, 30*time.Second, "the quiet compare to try again", func() bool { return lockedCatchUps.Load() >= 2 })
	stop()
	if err := <-ran; err == nil {
		t.Fatal("verification succeeded with green differing")
	}
	t.Logf("a writer waited %s; %d stalled catch-ups under the lock", waited.Round(time.Millisecond), lockedCatchUps.Load())
}
