package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/integration/pgtest"
)

func setupGate(t *testing.T) (string, *pgx.Conn) {
	t.Helper()
	ctx := context.Background()
	dsn := pgtest.NewDatabase(t)
	if r := runCLI(t, fastExit(), "--dsn", dsn, "init"); r.Code != 0 {
		t.Fatalf("init: %s", r.Stderr)
	}
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(ctx) })
	if _, err := c.Exec(ctx, `CREATE TABLE orders (id int PRIMARY KEY, customer_email text NOT NULL,
			name varchar(80), amount numeric(10,2), dup int);
		INSERT INTO orders VALUES (1, 'a', 'x', 1, 7), (2, 'b', 'y', 2, 7);
		CREATE INDEX orders_email_idx ON orders (customer_email);
		CREATE SCHEMA "Sales";
		CREATE TABLE "Sales"."Big Orders" ("Id" int);`); err != nil {
		t.Fatal(err)
	}
	// A failed concurrent build leaves an INVALID index behind.
	if _, err := c.Exec(ctx, `CREATE UNIQUE INDEX CONCURRENTLY orders_dup_idx ON orders (dup)`); err == nil {
		t.Fatal("unique index on duplicates succeeded")
	}
	for _, m := range []struct{ id, phase, err string }{
		{"m_copying", "copying", ""}, {"m_ready", "ready", ""}, {"m_cut", "cut_over", ""},
		{"m_final", "finalized", ""}, {"m_failed", "failed", "verification mismatch in chunk 12"},
		{"m_aborted", "aborted", ""}, {"m_rolled", "rolled_back", ""},
		{"m_notify_ok", "verifying", ""}, {"m_notify_fail", "copying", ""},
	} {
		if _, err := c.Exec(ctx, `INSERT INTO shadowctl.migrations (id, table_schema, table_name, green_schema, spec, phase, error)
			VALUES ($1, 'public', $1, 'green', '{}', $2, nullif($3, ''))`, m.id, m.phase, m.err); err != nil {
			t.Fatal(err)
		}
	}
	return dsn, c
}

// TestEverydayCheckExitStatuses: each check passes (0) or fails (1) with a
// one-line reason.
func TestEverydayCheckExitStatuses(t *testing.T) {
	dsn, _ := setupGate(t)
	cases := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--column", "orders.customer_email"}, 0, "ok: column"},
		{[]string{"--column", "orders.customer_email", "--type", "text", "--not-null"}, 0, "text NOT NULL"},
		{[]string{"--column", "public.orders.customer_email", "--type", "integer"}, 1, "is text, not integer"},
		{[]string{"--column", "orders.name", "--type", "varchar(80)"}, 0, "character varying(80)"},
		{[]string{"--column", "orders.name", "--type", "varchar"}, 0, "character varying(80)"},
		{[]string{"--column", "orders.name", "--type", "character varying(40)"}, 1, "not character varying(40)"},
		{[]string{"--column", "orders.amount", "--type", "numeric(10, 2)"}, 0, "numeric(10,2)"},
		{[]string{"--column", "orders.name", "--not-null"}, 1, "nullable"},
		{[]string{"--column", "orders.nope"}, 1, "does not exist"},
		{[]string{"--column", "nosuch.col"}, 1, "table"},
		{[]string{"--column", `"Sales"."Big Orders"."Id"`, "--type", "int"}, 0, "integer"},
		{[]string{"--column", `Sales."Big Orders"."Id"`}, 1, "does not exist"}, // unquoted folds to sales
		{[]string{"--column", "orders.name", "--type", "nosuchtype"}, 1, "unknown type"},
		{[]string{"--no-column", "orders.customer_name"}, 0, "does not exist"},
		{[]string{"--no-column", "orders.name"}, 1, "still exists"},
		{[]string{"--no-column", "gone.col"}, 0, "nor its table"},
		{[]string{"--index", "orders_email_idx", "--valid"}, 0, "(valid)"},
		{[]string{"--index", "public.orders_pkey"}, 0, "exists"},
		{[]string{"--index", "orders_dup_idx"}, 0, "INVALID"},
		{[]string{"--index", "orders_dup_idx", "--valid"}, 1, "INVALID"},
		{[]string{"--index", "orders"}, 1, "not an index"},
		{[]string{"--index", "nope_idx"}, 1, "does not exist"},
		{[]string{"--migration", "m_ready", "--phase", "ready"}, 0, "phase ready reached"},
		{[]string{"--migration", "m_cut", "--phase", "ready"}, 0, "reached"},
		{[]string{"--migration", "m_final", "--phase", "cut_over"}, 0, "reached"},
		{[]string{"--migration", "m_copying", "--phase", "ready"}, 1, "not reached yet"},
		{[]string{"--migration", "m_cut", "--phase", "finalized"}, 1, "not reached yet"},
		{[]string{"--migration", "m_rolled", "--phase", "ready"}, 0, "reached"},
		{[]string{"--migration", "m_rolled", "--phase", "cut_over"}, 1, "not reached"},
		{[]string{"--migration", "m_failed", "--phase", "pending"}, 1, "verification mismatch in chunk 12"},
		{[]string{"--migration", "m_aborted", "--phase", "ready"}, 1, "aborted"},
		{[]string{"--migration", "m_missing", "--phase", "ready"}, 1, "does not exist"},
		{[]string{"--migration", "m_ready", "--phase", "bogus"}, 1, "unknown phase"},
		{[]string{"--migration", "m_ready", "--phase", "failed"}, 1, "never satisfies"},
		{[]string{"--migration", "m_ready"}, 1, "go together"},
		{[]string{}, 1, "nothing to check"},
		{[]string{"--column", "orders.customer_email", "--index", "orders_dup_idx", "--valid"}, 1, "FAIL: index"},
	}
	for _, c := range cases {
		r := runCLI(t, fastExit(), append([]string{"--dsn", dsn, "check"}, c.args...)...)
		out := strings.TrimSpace(r.Stdout)
		if r.Code != c.code || !strings.Contains(out, c.want) {
			t.Errorf("check %q: exit %d, output %q (stderr %q); want exit %d and %q", c.args, r.Code, out, r.Stderr, c.code, c.want)
		}
		if len(c.args) <= 4 && strings.Count(out, "\n") > 0 {
			t.Errorf("check %q: more than one line: %q", c.args, out)
		}
	}
	// A catalog that does not exist reads as a missing migration.
	other := pgtest.NewDatabase(t)
	if r := runCLI(t, fastExit(), "--dsn", other, "check", "--migration", "m_ready", "--phase", "ready"); r.Code != 1 || !strings.Contains(r.Stdout, "does not exist") {
		t.Errorf("no catalog: exit %d %q", r.Code, r.Stdout)
	}
}

// TestEverydayWaitExitStatuses: 0 reached, 1 failed/aborted/missing, 2 timeout,
// 3 bad usage; a NOTIFY wakes it before the poll interval.
func TestEverydayWaitExitStatuses(t *testing.T) {
	ctx := context.Background()
	dsn, c := setupGate(t)
	cases := []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--migration", "m_ready", "--phase", "ready"}, 0, "ok:"},
		{[]string{"--migration", "m_final", "--phase", "cut_over"}, 0, "ok:"},
		{[]string{"--migration", "m_failed", "--phase", "ready"}, 1, "verification mismatch"},
		{[]string{"--migration", "m_aborted", "--phase", "ready"}, 1, "aborted"},
		{[]string{"--migration", "m_missing", "--phase", "ready"}, 1, "does not exist"},
		{[]string{"--migration", "m_copying", "--phase", "ready", "--timeout", "700ms", "--poll", "200ms"}, 2, "TIMEOUT"},
		{[]string{"--migration", "m_ready", "--phase", "bogus"}, 3, ""},
		{[]string{"--migration", "m_ready"}, 3, ""},
		{[]string{"--migration", "m_ready", "--phase", "ready", "--timeout", "soon"}, 3, ""},
	}
	for _, cs := range cases {
		r := runCLI(t, fastExit(), append([]string{"--dsn", dsn, "wait"}, cs.args...)...)
		if r.Code != cs.code || !strings.Contains(r.Stdout, cs.want) {
			t.Errorf("wait %q: exit %d, stdout %q, stderr %q; want exit %d and %q", cs.args, r.Code, r.Stdout, r.Stderr, cs.code, cs.want)
		}
	}

	// Woken by NOTIFY: the poll interval is far longer than the test allows.
	for _, n := range []struct {
		id, phase string
		code      int
	}{{"m_notify_ok", "ready", 0}, {"m_notify_fail", "failed", 1}} {
		began := time.Now()
		w := startCLI(t, "--dsn", dsn, "--log-format", "json", "wait", "--migration", n.id, "--phase", "ready",
			"--timeout", "5m", "--poll", "5m")
		// It has LISTENed once it has read the catalog and sits idle.
		pollUntil(t, 30*time.Second, "wait is listening", func() bool {
			return connScalar[bool](t, c, `SELECT EXISTS (SELECT FROM pg_stat_activity WHERE datname = current_database()
				AND application_name = 'shadowctl' AND state = 'idle' AND query LIKE '%migrations%')`)
		})
		if _, err := c.Exec(ctx, `UPDATE shadowctl.migrations SET phase = $2 WHERE id = $1`, n.id, n.phase); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Exec(ctx, `SELECT pg_notify('shadowctl', $1)`, n.id); err != nil {
			t.Fatal(err)
		}
		r := w.wait(t, 60*time.Second)
		if r.Code != n.code {
			t.Fatalf("wait for %s after NOTIFY: exit %d, want %d:\n%s\n%s", n.id, r.Code, n.code, r.Stdout, r.Stderr)
		}
		if el := time.Since(began); el > 60*time.Second {
			t.Fatalf("took %s: not woken by the NOTIFY", el)
		}
	}
}
