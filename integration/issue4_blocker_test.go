package integration

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/cutover"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/shadow"
)

// Issue 4, done-when 2: the cutover while another session holds a
// conflicting lock in an open transaction.

const (
	blockerLockTimeout = 100 * time.Millisecond
	// probeMargin is what a probe query may take beyond the lock timeout: the
	// swap's own hold time, scheduling, and the race detector.
	probeMargin = 150 * time.Millisecond
)

// probe runs a simple query on public.orders over and over on its own
// connection and measures each one: it is the application, waiting behind
// whatever the cutover does to the lock queue.
type latencyProbe struct {
	mu      sync.Mutex
	n       int
	max     time.Duration
	maxAt   time.Time // when the slowest query started
	slow    int       // queries that waited at least half the lock timeout
	errs    []error
	stop    chan struct{}
	done    chan struct{}
	started chan struct{}
	pid     uint32
}

func startLatencyProbe(db *testDB) *latencyProbe {
	c := db.connectAs("")
	p := &latencyProbe{stop: make(chan struct{}), done: make(chan struct{}), started: make(chan struct{}), pid: backendPID(c)}
	go func() {
		defer close(p.done)
		for i := 0; ; i++ {
			select {
			case <-p.stop:
				return
			default:
			}
			start := time.Now()
			var n int64
			err := c.QueryRow(context.Background(), `SELECT count(*) FROM public.orders WHERE id = 1`).Scan(&n)
			d := time.Since(start)
			p.mu.Lock()
			p.n++
			if d > p.max {
				p.max, p.maxAt = d, start
			}
			if d >= blockerLockTimeout/2 {
				p.slow++
			}
			if err != nil {
				p.errs = append(p.errs, err)
			}
			p.mu.Unlock()
			if i == 10 {
				close(p.started)
			}
		}
	}()
	<-p.started
	return p
}

func (p *latencyProbe) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.n
}

// finish stops the probe and checks THE invariant: no application query
// waited longer than the lock timeout plus the successful swap's measured
// hold (hold; zero when no swap happened) plus a small margin.
func (p *latencyProbe) finish(t *testing.T, hold time.Duration) {
	t.Helper()
	close(p.stop)
	<-p.done
	t.Logf("probe: %d queries, slowest %s (started %s), %d waited ≥ %s; swap hold %s",
		p.n, p.max.Round(time.Microsecond), p.maxAt.Format("15:04:05.000"), p.slow, blockerLockTimeout/2, hold.Round(time.Microsecond))
	if len(p.errs) > 0 {
		t.Errorf("probe queries failed: %v", errors.Join(p.errs...))
	}
	if limit := blockerLockTimeout + hold + probeMargin; p.max > limit {
		t.Errorf("a probe query on public.orders was blocked %s, longer than the lock timeout %s + the swap's hold %s + margin %s", p.max, blockerLockTimeout, hold, probeMargin)
	}
}

// lastHold is the lock hold of the migration's last successful swap.
func (db *testDB) lastHold(id string) time.Duration {
	db.t.Helper()
	if lc := db.get(id).State.LastCutover; lc != nil {
		return time.Duration(lc.LockHoldMS * float64(time.Millisecond))
	}
	return 0
}

// notBlamed checks that no attempt named the probe as a blocker: its short
// queries only waited behind the swap's queued lock (and took their lock
// when the swap gave up); they never blocked it, and canceling them would
// be the tool causing application errors.
func (p *latencyProbe) notBlamed(t *testing.T, attempts []cutover.Attempt) {
	t.Helper()
	for _, a := range attempts {
		for _, b := range a.Blockers {
			if uint32(b.PID) == p.pid {
				t.Errorf("attempt %d names the probe (an application query queued behind the swap) as a blocker: %s (canceled: %v)", a.No, b, b.Canceled)
			}
		}
	}
}

// hasPID reports whether the attempt named pid among its blockers.
func hasPID(a cutover.Attempt, pid uint32) bool {
	return slices.ContainsFunc(a.Blockers, func(b cutover.Blocker) bool { return uint32(b.PID) == pid })
}

// beginBlocker opens a transaction on its own connection and runs stmt in it.
func beginBlocker(db *testDB, stmt string) (*pgx.Conn, uint32) {
	db.t.Helper()
	c := db.connectAs("")
	for _, s := range []string{"BEGIN", stmt} {
		if _, err := c.Exec(context.Background(), s); err != nil {
			db.t.Fatalf("blocker: %s: %v", s, err)
		}
	}
	return c, backendPID(c)
}

type cutoverResult struct {
	m   *shadow.Migration
	err error
}

func TestIssue4CutoverWaitsForBlocker(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(2000)
	id := db.readyMigration("orders", issue4Alter)
	ctx := context.Background()

	blocker, pid := beginBlocker(db, `SELECT id FROM public.orders LIMIT 1`) // holds ACCESS SHARE
	p := startLatencyProbe(db)

	attempts := make(chan cutover.Attempt, 1000)
	res := make(chan cutoverResult, 1)
	go func() {
		m, err := db.Runner.Cutover(ctx, id, shadow.CutoverOptions{
			LockTimeout: blockerLockTimeout, Deadline: 30 * time.Second,
			OnAttempt: func(a cutover.Attempt) { attempts <- a },
		})
		res <- cutoverResult{m, err}
	}()

	// Let the cutover fail three times against the blocker, then end it.
	const wantAttempts = 3
	var seen []cutover.Attempt
	var probesBefore int
	timeout := time.After(20 * time.Second)
	for len(seen) < wantAttempts {
		select {
		case a := <-attempts:
			if len(seen) == 0 {
				probesBefore = p.count()
			}
			seen = append(seen, a)
		case r := <-res:
			t.Fatalf("the cutover ended while the blocker held its lock: %v", r.err)
		case <-timeout:
			_, _ = blocker.Exec(ctx, "ROLLBACK")
			t.Fatalf("no %d failed attempts reported within 20s (a cutover sitting in the lock queue?): got %d", wantAttempts, len(seen))
		}
	}
	probesDuring := p.count() - probesBefore
	if _, err := blocker.Exec(ctx, "COMMIT"); err != nil {
		t.Fatal(err)
	}
	var r cutoverResult
	select {
	case r = <-res:
	case <-time.After(20 * time.Second):
		t.Fatal("the cutover did not finish within 20s of the blocker's end")
	}
	p.finish(t, db.lastHold(id))
	if r.err != nil {
		t.Fatalf("cutover after the blocker ended: %v", r.err)
	}
	for _, a := range seen {
		if !hasPID(a, pid) {
			t.Errorf("attempt %d did not report the blocker pid %d: %+v", a.No, pid, a.Blockers)
		}
		// Each failed attempt sat in the queue for its whole lock timeout
		// (and not longer): the lock really was contended.
		if a.LockWait < blockerLockTimeout*9/10 || a.LockWait > blockerLockTimeout+probeMargin {
			t.Errorf("attempt %d waited %s for the lock, want about %s", a.No, a.LockWait, blockerLockTimeout)
		}
	}
	p.notBlamed(t, seen)
	for i := 1; i < len(seen); i++ {
		if seen[i].No != seen[i-1].No+1 {
			t.Errorf("attempt numbers not consecutive: %d then %d", seen[i-1].No, seen[i].No)
		}
	}
	// The probe ran while the cutover was queueing, and some of its queries
	// really waited behind the queued lock: the measurement saw the queue.
	if probesDuring < 3 {
		t.Errorf("only %d probe queries ran while the cutover retried", probesDuring)
	}
	if p.slow == 0 {
		t.Errorf("no probe query waited behind the cutover's queued lock: the test did not exercise the invariant")
	}
	db.assertServes(id, pgsql.QualifiedName{Schema: "public", Name: "orders"}, shadow.CutOver, "green")
	m := db.get(id)
	if m.State.LastCutover == nil || m.State.LastCutover.Attempts < wantAttempts+1 {
		t.Errorf("last cutover records %+v, want at least %d attempts", m.State.LastCutover, wantAttempts+1)
	}

	// Each attempt is in the event log, with its blockers.
	evs, err := db.Runner.Store.Events(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	var logged int
	for _, e := range evs {
		if e.Kind != "swap_attempt" {
			continue
		}
		var a cutover.Attempt
		if err := json.Unmarshal(e.Data, &a); err != nil {
			t.Fatalf("swap_attempt event data %s: %v", e.Data, err)
		}
		if !hasPID(a, pid) {
			t.Errorf("swap_attempt event %q does not name the blocker pid %d", e.Message, pid)
		}
		logged++
	}
	if logged < wantAttempts {
		t.Errorf("%d swap_attempt events, want at least %d", logged, wantAttempts)
	}
	t.Logf("%d failed attempts reported and logged; cutover took %d attempts, lock wait %.1f ms, hold %.1f ms",
		logged, m.State.LastCutover.Attempts, m.State.LastCutover.LockWaitMS, m.State.LastCutover.LockHoldMS)
}

func TestIssue4CutoverGivesUpAtDeadline(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(2000)
	id := db.readyMigration("orders", issue4Alter)
	ctx := context.Background()
	orders := pgsql.QualifiedName{Schema: "public", Name: "orders"}

	blocker, pid := beginBlocker(db, `LOCK TABLE public.orders IN ROW EXCLUSIVE MODE`)
	p := startLatencyProbe(db)
	var attempts []cutover.Attempt
	const deadline = time.Second
	start := time.Now()
	_, err := db.Runner.Cutover(ctx, id, shadow.CutoverOptions{
		LockTimeout: blockerLockTimeout, Deadline: deadline,
		OnAttempt: func(a cutover.Attempt) { attempts = append(attempts, a) },
	})
	took := time.Since(start)
	p.finish(t, 0)
	if !errors.Is(err, cutover.ErrDeadline) {
		t.Fatalf("cutover against a lock held past the deadline: err %v, want ErrDeadline", err)
	}
	if took < deadline || took > deadline+2*time.Second {
		t.Errorf("the cutover gave up after %s, want just after its %s deadline", took, deadline)
	}
	if len(attempts) < 2 || !hasPID(attempts[len(attempts)-1], pid) {
		t.Errorf("%d attempts, the last naming %+v; want several naming pid %d", len(attempts), attempts, pid)
	}
	p.notBlamed(t, attempts)
	t.Logf("gave up after %s and %d attempts: %v", took.Round(time.Millisecond), len(attempts), err)

	// Nothing changed: still ready, blue serves, nothing parked, and the
	// forward sync still carries writes to green.
	db.assertServes(id, orders, shadow.Ready, "blue")
	m := db.get(id)
	if k := db.relkind(pgsql.QualifiedName{Schema: "public", Name: m.State.Plan.Names.ParkedBlue}.Quoted()); k != "" {
		t.Fatalf("parked blue exists (relkind %q) after a cutover that gave up", k)
	}
	if _, err := blocker.Exec(ctx, "COMMIT"); err != nil {
		t.Fatal(err)
	}
	newID := scalar[int](db, `INSERT INTO public.orders (customer_id, amount) VALUES (7, 12.5) RETURNING id`)
	if n := scalar[int](db, `SELECT count(*) FROM green.orders WHERE id = $1 AND amount = 12.50`, newID); n != 1 {
		t.Fatalf("a write after the failed cutover did not reach green: the forward sync is gone")
	}
	// And the operator can simply try again.
	if m, err := db.Runner.Cutover(ctx, id, shadow.CutoverOptions{LockTimeout: blockerLockTimeout}); err != nil || m.Phase != shadow.CutOver {
		t.Fatalf("cutover after the deadline failure: %v", err)
	}
	db.assertServes(id, orders, shadow.CutOver, "green")
}

func TestIssue4CutoverCancelsBlockers(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(2000)
	id := db.readyMigration("orders", issue4Alter)
	ctx := context.Background()

	// One blocker idle in its transaction (a cancel does nothing there: it
	// must be terminated), one running a long statement (a cancel ends it,
	// and its aborted transaction holds no locks).
	idle, idlePID := beginBlocker(db, `SELECT id FROM public.orders LIMIT 1`)
	busy, busyPID := beginBlocker(db, `LOCK TABLE public.orders IN ROW EXCLUSIVE MODE`)
	busyErr := make(chan error, 1)
	go func() {
		_, err := busy.Exec(ctx, `SELECT pg_sleep(60)`)
		busyErr <- err
	}()
	waitUntil(t, "the busy blocker to be running its statement", 10*time.Second, func() bool {
		return scalar[bool](db, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active' AND query LIKE '%pg_sleep%')`, int64(busyPID))
	})
	p := startLatencyProbe(db)

	var attempts []cutover.Attempt
	m, err := db.Runner.Cutover(ctx, id, shadow.CutoverOptions{
		LockTimeout: blockerLockTimeout, Deadline: 20 * time.Second, CancelBlockersAfter: 150 * time.Millisecond,
		OnAttempt: func(a cutover.Attempt) { attempts = append(attempts, a) },
	})
	p.finish(t, db.lastHold(id))
	if err != nil {
		t.Fatalf("cutover with --cancel-blockers-after: %v", err)
	}
	if m.Phase != shadow.CutOver {
		t.Fatalf("phase %s", m.Phase)
	}
	db.assertServes(id, pgsql.QualifiedName{Schema: "public", Name: "orders"}, shadow.CutOver, "green")

	p.notBlamed(t, attempts)
	canceled := map[uint32]bool{}
	for _, a := range attempts {
		for _, b := range a.Blockers {
			if b.Canceled {
				canceled[uint32(b.PID)] = true
			}
		}
	}
	if !canceled[idlePID] || !canceled[busyPID] {
		t.Errorf("attempts report canceled %v, want both blockers %d (idle) and %d (busy): %+v", canceled, idlePID, busyPID, attempts)
	}
	if n := scalar[int](db, `SELECT count(*) FROM pg_stat_activity WHERE pid = $1`, int64(idlePID)); n != 0 {
		t.Errorf("the idle-in-transaction blocker %d still exists: it should have been terminated", idlePID)
	}
	if _, err := idle.Exec(ctx, "SELECT 1"); err == nil {
		t.Errorf("the idle blocker's connection still works after the cutover terminated it")
	}
	select {
	case err := <-busyErr:
		if pgsql.Code(err) != pgsql.CodeQueryCanceled {
			t.Errorf("the busy blocker's statement ended with %v, want a cancel (57014)", err)
		}
	case <-time.After(10 * time.Second):
		t.Errorf("the busy blocker's statement was not canceled")
	}
	for _, a := range attempts {
		t.Logf("attempt %d at %s: waited %s; blockers %v", a.No, a.At.Format("15:04:05.000"), a.LockWait.Round(time.Millisecond), a.Blockers)
	}
	if lc := m.State.LastCutover; lc != nil {
		t.Logf("%d failed attempts before the blockers were gone; the cutover's lock wait %.1f ms, hold %.1f ms", len(attempts), lc.LockWaitMS, lc.LockHoldMS)
	}
}

// The lock timeout bounds the whole time the swap sits in lock queues, not
// each LOCK statement: the swap locks public.orders first and then green and
// every table referencing orders, and while it waits for a later one it
// already holds orders, so the application queues behind it. Blockers on each
// of those tables, each ending just before the swap's wait on it would time
// out, must not add their waits up.
func TestIssue4LockTimeoutBoundsAllLockWaits(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(2000)
	db.exec(
		`CREATE TABLE order_items (order_id int REFERENCES orders ON DELETE CASCADE)`,
		`CREATE TABLE order_notes (order_id int REFERENCES orders ON DELETE CASCADE)`,
	)
	id := db.readyMigration("orders", issue4Alter)
	ctx := context.Background()

	m := db.get(id)
	tables := []pgsql.QualifiedName{m.Table, m.State.Plan.Forward.Target, {Schema: "public", Name: "order_items"}, {Schema: "public", Name: "order_notes"}}
	blockers := map[pgsql.QualifiedName]*pgx.Conn{}
	for _, tbl := range tables {
		blockers[tbl], _ = beginBlocker(db, "SELECT 1 FROM "+tbl.Quoted()+" LIMIT 1")
	}
	p := startLatencyProbe(db)
	res := make(chan cutoverResult, 1)
	var attempts []cutover.Attempt
	go func() {
		m, err := db.Runner.Cutover(ctx, id, shadow.CutoverOptions{
			LockTimeout: blockerLockTimeout, Deadline: 30 * time.Second,
			OnAttempt: func(a cutover.Attempt) { attempts = append(attempts, a) },
		})
		res <- cutoverResult{m, err}
	}()
	// Release each blocker, in the swap's lock order, once the swap has
	// waited for its table for 85% of the lock timeout (pg_locks.waitstart:
	// the condition itself). Counted per statement, one attempt would sit
	// 4 × 85 ms in the queues with public.orders held for most of it.
	released := 0
	threshold := blockerLockTimeout * 85 / 100
	for released < len(tables) {
		tbl := tables[released]
		waitUntil(t, "the swap to wait on "+tbl.String(), 20*time.Second, func() bool {
			return scalar[bool](db, `SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted AND relation = $1::regclass
				AND mode = 'AccessExclusiveLock' AND clock_timestamp() - waitstart >= $2::interval)`, tbl.Quoted(), threshold.String())
		})
		if _, err := blockers[tbl].Exec(ctx, "COMMIT"); err != nil {
			t.Fatal(err)
		}
		released++
	}
	var r cutoverResult
	select {
	case r = <-res:
	case <-time.After(30 * time.Second):
		t.Fatal("the cutover did not finish")
	}
	p.finish(t, db.lastHold(id))
	if r.err != nil {
		t.Fatalf("cutover: %v", r.err)
	}
	for _, a := range attempts {
		if a.LockWait > blockerLockTimeout+probeMargin/3 {
			t.Errorf("attempt %d sat %s in lock queues, lock timeout %s", a.No, a.LockWait, blockerLockTimeout)
		}
	}
	if lc := db.get(id).State.LastCutover; lc == nil || lc.LockWaitMS > float64((blockerLockTimeout+probeMargin/3).Milliseconds()) {
		t.Errorf("the successful attempt's lock wait: %+v, lock timeout %s", lc, blockerLockTimeout)
	}
	t.Logf("%d failed attempts before the cutover", len(attempts))
}

// A finalize (or rollback) that cannot take its lock before its deadline
// gives up cleanly too: still cut over (status says so), green serving, the
// soak clock not restarted, and the operator can still roll back.
func TestIssue4FinalizeGivesUpAtDeadline(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(2000)
	id := db.readyMigration("orders", issue4Alter)
	ctx := context.Background()
	orders := pgsql.QualifiedName{Schema: "public", Name: "orders"}
	if _, err := db.Runner.Cutover(ctx, id, shadow.CutoverOptions{}); err != nil {
		t.Fatal(err)
	}

	cutOverAt := db.get(id).CutOverAt
	blocker, pid := beginBlocker(db, `SELECT id FROM public.orders LIMIT 1`) // the view and green
	p := startLatencyProbe(db)
	var attempts []cutover.Attempt
	_, err := db.Runner.Finalize(ctx, id, 0, true, shadow.CutoverOptions{
		LockTimeout: blockerLockTimeout, Deadline: time.Second,
		OnAttempt: func(a cutover.Attempt) { attempts = append(attempts, a) },
	})
	p.finish(t, 0)
	p.notBlamed(t, attempts)
	if !errors.Is(err, cutover.ErrDeadline) {
		t.Fatalf("finalize against a lock held past the deadline: %v, want ErrDeadline", err)
	}
	if len(attempts) == 0 || !hasPID(attempts[len(attempts)-1], pid) {
		t.Errorf("attempts %+v do not name the blocker %d", attempts, pid)
	}
	db.assertServes(id, orders, shadow.CutOver, "green")
	if got := db.get(id).CutOverAt; got == nil || !got.Equal(*cutOverAt) {
		t.Errorf("cut_over_at moved from %v to %v: a finalize that did not happen restarted the soak clock", cutOverAt, got)
	}
	_, err = db.Runner.Rollback(ctx, id, shadow.CutoverOptions{LockTimeout: blockerLockTimeout, Deadline: 500 * time.Millisecond})
	if !errors.Is(err, cutover.ErrDeadline) {
		t.Fatalf("rollback against a lock held past the deadline: %v, want ErrDeadline", err)
	}
	db.assertServes(id, orders, shadow.CutOver, "green")
	if got := db.get(id).CutOverAt; got == nil || !got.Equal(*cutOverAt) {
		t.Errorf("cut_over_at moved from %v to %v: a rollback that did not happen restarted the soak clock", cutOverAt, got)
	}
	if _, err := blocker.Exec(ctx, "COMMIT"); err != nil {
		t.Fatal(err)
	}
	if m, err := db.Runner.Rollback(ctx, id, shadow.CutoverOptions{}); err != nil || m.Phase != shadow.RolledBack {
		t.Fatalf("rollback after a finalize that gave up: %v", err)
	}
	db.assertServes(id, orders, shadow.RolledBack, "blue")
}
