package integration

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/integration/pgtest"
	"github.com/shadowctl/shadowctl/lock"
)

// lockPollUntil polls cond until it holds, failing the test after timeout.
func lockPollUntil(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting until %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func lockConfig(t testing.TB, dsn string) *pgx.ConnConfig {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// lockObserver is a plain connection for looking at pg_locks.
func lockObserver(t testing.TB, dsn string) *pgx.Conn {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	return conn
}

// lockWaiters counts sessions queued (not granted) for the advisory key.
func lockWaiters(t testing.TB, conn *pgx.Conn, key int64) int {
	t.Helper()
	var n int
	err := conn.QueryRow(context.Background(), `SELECT count(*) FROM pg_locks
		WHERE locktype = 'advisory' AND NOT granted AND objsubid = 1
		  AND classid::int8 = ($1::int8 >> 32) & 4294967295 AND objid::int8 = $1::int8 & 4294967295`, key).Scan(&n)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func lockHolders(t testing.TB, conn *pgx.Conn, key int64) []lock.Holder {
	t.Helper()
	hs, err := lock.Holders(context.Background(), conn, key)
	if err != nil {
		t.Fatal(err)
	}
	return hs
}

func TestLockKeyForMatchesDocumentedSQL(t *testing.T) {
	conn := lockObserver(t, pgtest.NewDatabase(t))
	for _, name := range []string{"migrations", "orders", "", "ünïcode name"} {
		var sqlKey int64
		if err := conn.QueryRow(context.Background(),
			`SELECT ('x' || left(encode(sha256(convert_to('shadowctl:' || $1::text, 'UTF8')), 'hex'), 16))::bit(64)::bigint`,
			name).Scan(&sqlKey); err != nil {
			t.Fatal(err)
		}
		if got := lock.KeyFor(name); got != sqlKey {
			t.Errorf("KeyFor(%q) = %d, SQL derivation gives %d", name, got, sqlKey)
		}
	}
}

func TestLockHeldErrorNamesHolderThenWaiterGetsIt(t *testing.T) {
	ctx := context.Background()
	dsn := pgtest.NewDatabase(t)
	obs := lockObserver(t, dsn)
	const name = "orders table"

	a, err := lock.Acquire(ctx, lockConfig(t, dsn), name, 0)
	if err != nil {
		t.Fatalf("first acquire: %v", err)
	}
	t.Cleanup(func() { _ = a.Release(ctx) })
	if a.Name() != name || a.Key() != lock.KeyFor(name) || a.Err() != nil {
		t.Fatalf("lock: name %q key %d err %v", a.Name(), a.Key(), a.Err())
	}

	hs := lockHolders(t, obs, a.Key())
	if len(hs) != 1 || hs[0].PID != a.BackendPID() {
		t.Fatalf("holders %+v, want exactly pid %d", hs, a.BackendPID())
	}
	h := hs[0]
	if h.ApplicationName != "shadowctl lock "+name || !h.SinceGrant || h.Since.Before(h.BackendStart) || h.ClientAddr == "" {
		t.Fatalf("holder details: %+v", h)
	}

	// Try once: fails at once with the holder named.
	_, err = lock.Acquire(ctx, lockConfig(t, dsn), name, 0)
	var held *lock.HeldError
	if !errors.As(err, &held) || !errors.Is(err, lock.ErrHeld) {
		t.Fatalf("second acquire: %v, want a HeldError", err)
	}
	if len(held.Holders) != 1 || held.Holders[0].PID != a.BackendPID() || held.Name != name || held.Key != a.Key() {
		t.Fatalf("HeldError %+v", held)
	}
	for _, want := range []string{"pid", `application "shadowctl lock orders table"`, "holding since"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("message %q lacks %q", err, want)
		}
	}

	// Wait a bounded time: HeldError after at least that long, and no
	// waiter left in the lock queue.
	start := time.Now()
	_, err = lock.Acquire(ctx, lockConfig(t, dsn), name, 300*time.Millisecond)
	if !errors.As(err, &held) || held.Waited < 300*time.Millisecond || time.Since(start) < 300*time.Millisecond {
		t.Fatalf("waiting acquire: %v (waited %v)", err, time.Since(start))
	}
	if n := lockWaiters(t, obs, a.Key()); n != 0 {
		t.Fatalf("%d waiters left queued after the wait timed out", n)
	}

	// A waiter is granted the lock when the holder releases it.
	type result struct {
		l   *lock.Lock
		err error
	}
	got := make(chan result, 1)
	var waited []lock.Holder
	go func() {
		l, err := lock.AcquireWith(ctx, lockConfig(t, dsn), name, lock.Options{
			Wait: 30 * time.Second, OnWait: func(hs []lock.Holder) { waited = hs },
		})
		got <- result{l, err}
	}()
	lockPollUntil(t, 10*time.Second, "the second session queues", func() bool { return lockWaiters(t, obs, a.Key()) == 1 })
	if err := a.Release(ctx); err != nil {
		t.Fatalf("release: %v", err)
	}
	r := <-got
	if r.err != nil {
		t.Fatalf("waiter: %v", r.err)
	}
	defer r.l.Release(ctx)
	if len(waited) != 1 || waited[0].PID != a.BackendPID() {
		t.Fatalf("OnWait saw %+v, want the first holder", waited)
	}
	if hs := lockHolders(t, obs, a.Key()); len(hs) != 1 || hs[0].PID != r.l.BackendPID() {
		t.Fatalf("after hand-over holders are %+v, want pid %d", hs, r.l.BackendPID())
	}
}

func TestLockReleaseIsIdempotent(t *testing.T) {
	ctx := context.Background()
	dsn := pgtest.NewDatabase(t)
	obs := lockObserver(t, dsn)
	l, err := lock.Acquire(ctx, lockConfig(t, dsn), "idem", 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := l.Release(ctx); err != nil {
			t.Fatalf("release #%d: %v", i+1, err)
		}
	}
	if !errors.Is(l.Err(), lock.ErrReleased) {
		t.Fatalf("Err after release = %v", l.Err())
	}
	if hs := lockHolders(t, obs, l.Key()); len(hs) != 0 {
		t.Fatalf("still held after release: %+v", hs)
	}
	select {
	case <-l.Lost():
		t.Fatal("Lost closed by a plain release")
	default:
	}
	again, err := lock.Acquire(ctx, lockConfig(t, dsn), "idem", 0)
	if err != nil {
		t.Fatalf("re-acquire: %v", err)
	}
	_ = again.Release(ctx)
}

func TestLockLostWhenBackendTerminated(t *testing.T) {
	ctx := context.Background()
	dsn := pgtest.NewDatabase(t)
	obs := lockObserver(t, dsn)
	l, err := lock.Acquire(ctx, lockConfig(t, dsn), "doomed", 0)
	if err != nil {
		t.Fatal(err)
	}
	var ok bool
	if err := obs.QueryRow(ctx, `SELECT pg_terminate_backend($1)`, l.BackendPID()).Scan(&ok); err != nil || !ok {
		t.Fatalf("terminate: %v %v", ok, err)
	}
	start := time.Now()
	select {
	case <-l.Lost():
	case <-time.After(5 * time.Second):
		t.Fatal("Lost not closed 5s after pg_terminate_backend")
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("Lost closed after %v, want within 1s", d)
	}
	if !errors.Is(l.Err(), lock.ErrLost) {
		t.Fatalf("Err = %v, want ErrLost", l.Err())
	}
	t.Logf("loss noticed after %v: %v", time.Since(start), l.Err())
	if err := l.Release(ctx); err != nil || l.Release(ctx) != nil {
		t.Fatalf("release after loss: %v", err)
	}
	if !errors.Is(l.Err(), lock.ErrLost) {
		t.Fatalf("release overwrote the loss: %v", l.Err())
	}
	// The server ends the session and its lock: someone else can take it.
	other, err := lock.Acquire(ctx, lockConfig(t, dsn), "doomed", 5*time.Second)
	if err != nil {
		t.Fatalf("acquire after the holder was terminated: %v", err)
	}
	_ = other.Release(ctx)
}

func TestLockReleasedWhenContextCancelled(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	obs := lockObserver(t, dsn)
	ctx, cancel := context.WithCancel(context.Background())
	l, err := lock.Acquire(ctx, lockConfig(t, dsn), "scoped", 0)
	if err != nil {
		t.Fatal(err)
	}
	if hs := lockHolders(t, obs, l.Key()); len(hs) != 1 {
		t.Fatalf("holders %+v", hs)
	}
	cancel()
	lockPollUntil(t, 5*time.Second, "the lock is released after ctx cancel", func() bool {
		return len(lockHolders(t, obs, l.Key())) == 0
	})
	lockPollUntil(t, 5*time.Second, "Err reports the release", func() bool { return l.Err() != nil })
	if !errors.Is(l.Err(), lock.ErrReleased) || !errors.Is(l.Err(), context.Canceled) {
		t.Fatalf("Err = %v, want ErrReleased and context.Canceled", l.Err())
	}
	if err := l.Release(context.Background()); err != nil {
		t.Fatalf("Release after ctx release: %v", err)
	}
}

func TestLockCancelWhileWaitingLeavesNoWaiter(t *testing.T) {
	ctx := context.Background()
	dsn := pgtest.NewDatabase(t)
	obs := lockObserver(t, dsn)
	holder, err := lock.Acquire(ctx, lockConfig(t, dsn), "busy", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Release(ctx)

	wctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		l, err := lock.Acquire(wctx, lockConfig(t, dsn), "busy", time.Minute)
		if l != nil {
			_ = l.Release(ctx)
		}
		done <- err
	}()
	lockPollUntil(t, 10*time.Second, "the waiter queues", func() bool { return lockWaiters(t, obs, holder.Key()) == 1 })
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("cancelled wait returned %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Acquire did not return 5s after its ctx was cancelled")
	}
	lockPollUntil(t, 5*time.Second, "the cancelled waiter leaves the queue", func() bool { return lockWaiters(t, obs, holder.Key()) == 0 })
	if holder.Err() != nil {
		t.Fatalf("holder disturbed: %v", holder.Err())
	}
}

func TestLockIsPerDatabaseAndKeyed(t *testing.T) {
	ctx := context.Background()
	dsn1, dsn2 := pgtest.NewDatabase(t), pgtest.NewDatabase(t)
	a, err := lock.Acquire(ctx, lockConfig(t, dsn1), "same", 0)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Release(ctx)
	b, err := lock.Acquire(ctx, lockConfig(t, dsn2), "same", 0)
	if err != nil {
		t.Fatalf("same name, other database: %v", err)
	}
	defer b.Release(ctx)
	c, err := lock.Acquire(ctx, lockConfig(t, dsn1), "other", 0)
	if err != nil {
		t.Fatalf("other name, same database: %v", err)
	}
	defer c.Release(ctx)
	if hs := lockHolders(t, lockObserver(t, dsn1), a.Key()); len(hs) != 1 || hs[0].PID != a.BackendPID() {
		t.Fatalf("holders in db1: %+v", hs)
	}
}

// Cancelling right after Acquire returns races the release with the
// caller's use of the lock: the race detector must stay quiet and the lock
// must end up free every time.
func TestLockCancelRightAfterAcquire(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	obs := lockObserver(t, dsn)
	cfg := lockConfig(t, dsn)
	for i := 0; i < 10; i++ {
		ctx, cancel := context.WithCancel(context.Background())
		l, err := lock.Acquire(ctx, cfg, "flash", time.Second)
		if err != nil {
			t.Fatalf("#%d: %v", i, err)
		}
		cancel()
		_ = l.Err()
		_ = l.Release(context.Background())
		if !errors.Is(l.Err(), lock.ErrReleased) {
			t.Fatalf("#%d: Err = %v", i, l.Err())
		}
	}
	if hs := lockHolders(t, obs, lock.KeyFor("flash")); len(hs) != 0 {
		t.Fatalf("still held: %+v", hs)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := lock.Acquire(ctx, cfg, "flash", 0); !errors.Is(err, context.Canceled) {
		t.Fatalf("acquire with a cancelled ctx: %v", err)
	}
}
