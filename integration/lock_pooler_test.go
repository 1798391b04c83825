package integration

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/integration/pgtest"
	"github.com/shadowctl/shadowctl/lock"
)

// Through a transaction-pooling proxy the advisory lock is taken by one
// server session and checked from another: Acquire refuses with ErrPooler,
// and once the client is gone no lock is left behind on any session.
func TestLockRefusesATransactionPoolingProxy(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	ctx := context.Background()
	proxy := startTxPoolProxy(t, dsn)
	viaProxy := proxy.DSN(dsn)

	// The proxy does what a transaction pool does: successive transactions
	// of one client connection run in different server sessions.
	conn, err := pgx.Connect(ctx, viaProxy)
	if err != nil {
		t.Fatalf("connect through the proxy: %v", err)
	}
	pids := map[int32]bool{}
	for range 4 {
		var pid int32
		if err := conn.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&pid); err != nil {
			t.Fatalf("query through the proxy: %v", err)
		}
		pids[pid] = true
	}
	conn.Close(ctx)
	if len(pids) != 2 {
		t.Fatalf("4 queries through the proxy ran in %d server sessions, want 2 (it does not pool)", len(pids))
	}

	observer := lockObserver(t, dsn)
	_, err = lock.Acquire(ctx, lockConfig(t, viaProxy), "through-a-pooler", 0)
	if !errors.Is(err, lock.ErrPooler) {
		t.Fatalf("Acquire through a transaction pool returned %v, want ErrPooler", err)
	}
	if !strings.Contains(err.Error(), "session-mode pool") {
		t.Fatalf("the error does not say what to do instead: %v", err)
	}
	key := lock.KeyFor("through-a-pooler")
	noHolder := func() {
		t.Helper()
		waitFor(t, "no session to hold the refused lock", 10*time.Second, func() (bool, error) {
			return len(lockHolders(t, observer, key)) == 0, nil
		})
	}
	noHolder()

	// `shadowctl lock` through the proxy runs nothing and says why.
	marker := t.TempDir() + "/ran"
	r := runCLI(t, nil, "--dsn", viaProxy, "lock", "--key", "through-a-pooler", "--", "touch", marker)
	if r.Code == 0 || !strings.Contains(r.Stderr, "transaction-pooling proxy") {
		t.Fatalf("lock through a transaction pool: exit %d, stderr:\n%s", r.Code, r.Stderr)
	}
	if _, err := os.Stat(marker); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the command ran although the lock was refused (stat: %v)", err)
	}
	t.Logf("shadowctl lock through the proxy: exit %d: %s", r.Code, strings.TrimSpace(r.Stderr))
	noHolder()

	// A direct connection takes it.
	l, err := lock.Acquire(ctx, lockConfig(t, dsn), "through-a-pooler", 0)
	if err != nil {
		t.Fatalf("Acquire directly after the refusal: %v", err)
	}
	_ = l.Release(ctx)
}

// `shadowctl start` through a transaction pool refuses before it changes
// anything: no migration recorded, no green table, no trigger.
func TestStartRefusesATransactionPoolingProxy(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(1000)
	viaProxy := startTxPoolProxy(t, db.DSN).DSN(db.DSN)
	r := runCLI(t, nil, "--dsn", viaProxy, "start", "--table", "orders", "--alter", "ALTER COLUMN amount TYPE numeric(12,2)")
	t.Logf("start through the proxy: exit %d: %s", r.Code, strings.TrimSpace(r.Stderr))
	if r.Code == 0 || !strings.Contains(r.Stderr, "transaction-pooling proxy") {
		t.Fatalf("start through a transaction pool: exit %d, stderr:\n%s", r.Code, r.Stderr)
	}
	if scalar[bool](db, `SELECT to_regclass('shadowctl.migrations') IS NOT NULL`) {
		if n := scalar[int](db, `SELECT count(*)::int FROM shadowctl.migrations`); n != 0 {
			t.Fatalf("start through a transaction pool left %d migrations in the catalog", n)
		}
	}
	if n := scalar[int](db, `SELECT count(*)::int FROM pg_trigger WHERE tgrelid = 'orders'::regclass AND NOT tgisinternal`); n != 0 {
		t.Fatalf("start through a transaction pool left %d triggers on orders", n)
	}
	if n := scalar[int](db, `SELECT count(*)::int FROM pg_class WHERE relnamespace = to_regnamespace('green')`); n != 0 {
		t.Fatalf("start through a transaction pool left %d relations in schema green", n)
	}
}
