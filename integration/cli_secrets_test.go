package integration

import (
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A password in the DSN (or in PGPASSWORD) never shows in what any command
// prints, on success or on failure, nor in what the catalog keeps (requests,
// events, backfills). The test server trusts every password, so each
// command reaches the database with one in its DSN.
func TestNoCommandPrintsThePassword(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(500)
	const secret = "s3cr3t-Cli-pw-42"
	u, err := url.Parse(db.DSN)
	if err != nil {
		t.Fatal(err)
	}
	u.User = url.UserPassword(u.User.Username(), secret)
	dir := t.TempDir()
	failing := filepath.Join(dir, "bad.sql")
	if err := os.WriteFile(failing, []byte("SELECT 1;\nSELECT 1 / 0;\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	runs := [][]string{
		{"init"},
		{"start", "--table", "nosuch", "--alter", "ADD COLUMN x int"},
		{"start", "--table", "orders", "--alter", "ALTER COLUMN amount TYPE numeric(12,2)", "--name", "m1", "--no-progress"},
		{"status", "m1"}, {"status"}, {"list"}, {"events", "m1"},
		{"wait", "--migration", "m1", "--phase", "ready", "--timeout", "30s"},
		{"check", "--migration", "m1", "--phase", "cut_over"},
		{"check", "--column", "orders.nosuch"},
		{"exec", failing},
		{"backfill", "--table", "orders", "--set", "status = status"},
		{"backfill", "--table", "orders", "--set", "nosuch = 1"},
		{"cutover", "m1"}, {"rollback", "m1"}, {"abort", "m1"},
		{"status", "nosuch-migration"},
	}
	for _, env := range [][]string{
		{"SHADOWCTL_DSN=" + u.String()},
		{"SHADOWCTL_DSN=" + db.DSN, "PGPASSWORD=" + secret},
	} {
		for _, args := range runs {
			r := runCLI(t, env, args...)
			if strings.Contains(r.Stdout+r.Stderr, secret) {
				t.Fatalf("shadowctl %s (exit %d) printed the password:\n%s%s", strings.Join(args, " "), r.Code, r.Stdout, r.Stderr)
			}
		}
	}
	// And where no server answers: the connection errors name the target,
	// not the password.
	refused := "postgres://alice:" + secret + "@127.0.0.1:1/nodb?sslmode=disable&connect_timeout=2"
	for _, args := range [][]string{
		{"status"}, {"start", "--table", "orders", "--alter", "ADD COLUMN x int"}, {"exec", failing},
		{"backfill", "--table", "orders", "--set", "status = status"}, {"check", "--column", "orders.id"},
		{"wait", "--migration", "m1", "--phase", "ready", "--timeout", "3s"}, {"cutover", "m1"}, {"events", "m1"},
	} {
		r := runCLI(t, []string{"SHADOWCTL_DSN=" + refused}, args...)
		if r.Code == 0 || strings.Contains(r.Stdout+r.Stderr, secret) {
			t.Fatalf("shadowctl %s against no server: exit %d, output:\n%s%s", strings.Join(args, " "), r.Code, r.Stdout, r.Stderr)
		}
	}
	// Both successes and failures were exercised.
	if r := runCLI(t, []string{"SHADOWCTL_DSN=" + u.String()}, "status", "m1"); r.Code != 0 || !strings.Contains(r.Stdout, "aborted") {
		t.Fatalf("status m1: exit %d, %s%s; want the aborted migration", r.Code, r.Stdout, r.Stderr)
	}
	if n := scalar[int](db, `SELECT count(*) FROM (
		SELECT row_to_json(m)::text AS j FROM shadowctl.migrations m
		UNION ALL SELECT row_to_json(e)::text FROM shadowctl.events e
		UNION ALL SELECT row_to_json(b)::text FROM shadowctl.backfills b) x WHERE j LIKE '%' || $1 || '%'`, secret); n != 0 {
		t.Fatalf("%d catalog rows hold the password", n)
	}
}
