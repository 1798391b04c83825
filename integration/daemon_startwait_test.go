package integration

import (
	"strings"
	"testing"

	"github.com/shadowctl/shadowctl/internal/daemon"
)

// `start --detach --wait ready` submits the migration and returns once the
// daemon has brought it to ready (exit 0, as `wait` does).
func TestStartDetachWaitsForDaemon(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(3000)
	db.startDaemon(daemon.Config{})
	r := runCLI(t, nil, "--dsn", db.DSN, "start", "--table", "orders", "--alter", "ALTER COLUMN amount TYPE numeric(12,2)",
		"--detach", "--wait", "ready", "--wait-timeout", "90s", "--name", "detached")
	if r.Code != 0 || !strings.Contains(r.Stdout, "ok: ") {
		t.Fatalf("start --detach --wait: exit %d\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
	if m := db.migration("detached"); m.Phase != "ready" {
		t.Fatalf("phase %s after the wait", m.Phase)
	}
	bad := runCLI(t, nil, "--dsn", db.DSN, "start", "--table", "customers", "--alter", "ADD COLUMN x int", "--detach", "--wait", "nonsense")
	if bad.Code == 0 || !strings.Contains(bad.Stderr, "--wait") {
		t.Fatalf("--wait with an unknown phase: exit %d, %s", bad.Code, bad.Stderr)
	}
	if n := scalar[int](db, `SELECT count(*) FROM shadowctl.migrations WHERE table_name = 'customers'`); n != 0 {
		t.Fatal("a refused --wait still submitted a migration")
	}
}
