package integration

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/integration/pgtest"
)

// bgCLI is a shadowctl run in the background whose stderr is watched line by
// line.
type bgCLI struct {
	cmd    *exec.Cmd
	stdout bytes.Buffer
	mu     sync.Mutex
	stderr strings.Builder
	seen   chan string
	done   chan cliResult
}

func startCLI(t testing.TB, args ...string) *bgCLI {
	t.Helper()
	b := &bgCLI{seen: make(chan string, 10000), done: make(chan cliResult, 1)}
	b.cmd = exec.Command(shadowctlBinary(t), args...)
	b.cmd.Env = append(os.Environ(), fastExit()...)
	b.cmd.Stdout = &b.stdout
	pipe, err := b.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := b.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		sc := bufio.NewScanner(pipe)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			b.mu.Lock()
			b.stderr.WriteString(sc.Text() + "\n")
			b.mu.Unlock()
			select {
			case b.seen <- sc.Text():
			default:
			}
		}
	}()
	go func() {
		<-scanned
		err := b.cmd.Wait()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		b.mu.Lock()
		b.done <- cliResult{Code: code, Stdout: b.stdout.String(), Stderr: b.stderr.String()}
		b.mu.Unlock()
	}()
	t.Cleanup(func() { _ = b.cmd.Process.Kill() })
	return b
}

// fastExit is the environment that spares each run of the race-enabled
// binary the race runtime's one-second sleep at a successful exit.
func fastExit() []string {
	opts := "atexit_sleep_ms=0"
	if g := os.Getenv("GORACE"); g != "" {
		opts = g + " " + opts
	}
	return []string{"GORACE=" + opts}
}

// waitLine waits for a stderr line containing all of subs.
func (b *bgCLI) waitLine(t testing.TB, within time.Duration, subs ...string) string {
	t.Helper()
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	for {
		select {
		case l := <-b.seen:
			ok := true
			for _, s := range subs {
				ok = ok && strings.Contains(l, s)
			}
			if ok {
				return l
			}
		case <-deadline.C:
			b.mu.Lock()
			defer b.mu.Unlock()
			t.Fatalf("no stderr line with %q within %s; stderr so far:\n%s", subs, within, b.stderr.String())
		}
	}
}

func (b *bgCLI) wait(t testing.TB, within time.Duration) cliResult {
	t.Helper()
	select {
	case r := <-b.done:
		return r
	case <-time.After(within):
		_ = b.cmd.Process.Kill()
		t.Fatalf("shadowctl %v did not finish within %s", b.cmd.Args[1:], within)
	}
	return cliResult{}
}

// waitingOnLock reports whether a shadowctl session is waiting for a lock
// held by another session right now.
func waitingOnLock(t testing.TB, c *pgx.Conn) bool {
	return connScalar[bool](t, c, `SELECT EXISTS (SELECT FROM pg_stat_activity
		WHERE datname = current_database() AND application_name = 'shadowctl'
		  AND wait_event_type = 'Lock' AND cardinality(pg_blocking_pids(pid)) > 0)`)
}

func writeSQL(t testing.TB, name, sql string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(sql), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// probe measures the latency of a point read on the table until stopped.
type probe struct {
	stop   chan struct{}
	done   chan struct{}
	maxLat time.Duration
	n      int
	err    error
}

func startProbe(t testing.TB, dsn string) *probe {
	t.Helper()
	ctx := context.Background()
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	p := &probe{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		defer c.Close(ctx)
		tick := time.NewTicker(10 * time.Millisecond) // pacing only
		defer tick.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-tick.C:
			}
			start := time.Now()
			var v int
			if err := c.QueryRow(ctx, `SELECT v FROM t WHERE id = 2`).Scan(&v); err != nil {
				p.err = err
				return
			}
			p.maxLat = max(p.maxLat, time.Since(start))
			p.n++
		}
	}()
	return p
}

func (p *probe) finish() (time.Duration, int, error) {
	close(p.stop)
	<-p.done
	return p.maxLat, p.n, p.err
}

func setupExecTable(t testing.TB) (string, *pgx.Conn) {
	t.Helper()
	ctx := context.Background()
	dsn := pgtest.NewDatabase(t)
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(ctx) })
	if _, err := c.Exec(ctx, `CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL, payload text);
		INSERT INTO t SELECT g, g % 100, 'p' || g FROM generate_series(1, 20000) g;`); err != nil {
		t.Fatal(err)
	}
	return dsn, c
}

func connScalar[T any](t testing.TB, c *pgx.Conn, sql string, args ...any) T {
	t.Helper()
	var v T
	if err := c.QueryRow(context.Background(), sql, args...).Scan(&v); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return v
}

// TestEverydayExecRetriesBehindALongTransaction: a file mixing transactional
// DDL, CREATE INDEX CONCURRENTLY and a BEGIN/COMMIT block runs while another
// transaction holds a conflicting lock; exec retries under its lock_timeout
// (other clients wait at most that long) and succeeds once it is released.
func TestEverydayExecRetriesBehindALongTransaction(t *testing.T) {
	ctx := context.Background()
	dsn, c := setupExecTable(t)
	const lockTimeout = 300 * time.Millisecond
	file := writeSQL(t, "expand.sql", `-- expand: a column, its index, a side table
ALTER TABLE t ADD COLUMN note text;
CREATE INDEX CONCURRENTLY t_note_idx ON t (note);
CREATE TABLE t_audit (id bigint PRIMARY KEY, body text DEFAULT 'a;b');
BEGIN;
UPDATE t SET note = 'x' WHERE id <= 10;
INSERT INTO t_audit VALUES (1, $$semi;colon$$);
COMMIT;
`)
	holder, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close(ctx)
	if _, err := holder.Exec(ctx, `BEGIN; UPDATE t SET v = v WHERE id = 1`); err != nil {
		t.Fatal(err)
	}
	p := startProbe(t, dsn)
	run := startCLI(t, "--dsn", dsn, "--log-format", "json", "exec", "--lock-timeout", lockTimeout.String(), "--retries", "100", file)
	run.waitLine(t, 60*time.Second, `"message":"retrying ALTER TABLE t ADD COLUMN note text"`, `"statement":1`)
	pollUntil(t, 30*time.Second, "exec's session is seen waiting on the holder's lock", func() bool { return waitingOnLock(t, c) })
	if _, err := holder.Exec(ctx, `ROLLBACK`); err != nil {
		t.Fatal(err)
	}
	res := run.wait(t, 60*time.Second)
	maxLat, probes, perr := p.finish()
	if res.Code != 0 {
		t.Fatalf("exec exited %d:\n%s\n%s", res.Code, res.Stdout, res.Stderr)
	}
	if !strings.Contains(res.Stdout, "5 statements ran") {
		t.Fatalf("stdout %q", res.Stdout)
	}
	if perr != nil {
		t.Fatalf("probe error: %v", perr)
	}
	if bound := lockTimeout + 1500*time.Millisecond; maxLat > bound {
		t.Fatalf("a reader waited %s (of %d probes), more than the lock timeout %s + margin", maxLat, probes, lockTimeout)
	}
	t.Logf("probe: %d reads, slowest %s (lock timeout %s)", probes, maxLat, lockTimeout)
	if !connScalar[bool](t, c, `SELECT indisvalid FROM pg_index WHERE indexrelid = 't_note_idx'::regclass`) {
		t.Fatal("t_note_idx is not valid")
	}
	if n := connScalar[int64](t, c, `SELECT count(*) FROM t WHERE note = 'x'`); n != 10 {
		t.Fatalf("%d rows noted, want 10", n)
	}
	if b := connScalar[string](t, c, `SELECT body FROM t_audit WHERE id = 1`); b != "semi;colon" {
		t.Fatalf("t_audit body %q", b)
	}
}

// TestEverydayExecConcurrentIndexRetryDropsInvalid: CREATE INDEX
// CONCURRENTLY times out waiting for a transaction on the table, leaving an
// INVALID index; exec drops it and the retry builds a valid one.
func TestEverydayExecConcurrentIndexRetryDropsInvalid(t *testing.T) {
	ctx := context.Background()
	dsn, c := setupExecTable(t)
	file := writeSQL(t, "index.sql", "CREATE INDEX CONCURRENTLY t_v_idx ON t (v);\n")
	holder, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close(ctx)
	if _, err := holder.Exec(ctx, `BEGIN; UPDATE t SET v = v WHERE id = 1`); err != nil {
		t.Fatal(err)
	}
	run := startCLI(t, "--dsn", dsn, "--log-format", "json", "exec", "--lock-timeout", "300ms", "--retries", "100", file)
	run.waitLine(t, 60*time.Second, "dropping the INVALID index it left", "t_v_idx")
	// While the holder stays, the failed build's INVALID index is there and
	// exec's session keeps bumping into the holder's lock.
	pollUntil(t, 30*time.Second, "the INVALID index is seen and exec waits on a lock", func() bool {
		return connScalar[bool](t, c, `SELECT EXISTS (SELECT FROM pg_index WHERE indexrelid = to_regclass('t_v_idx') AND NOT indisvalid)`) &&
			waitingOnLock(t, c)
	})
	if _, err := holder.Exec(ctx, `ROLLBACK`); err != nil {
		t.Fatal(err)
	}
	res := run.wait(t, 60*time.Second)
	if res.Code != 0 {
		t.Fatalf("exec exited %d:\n%s\n%s", res.Code, res.Stdout, res.Stderr)
	}
	if strings.Contains(res.Stdout, "(0 retries)") {
		t.Fatalf("no retry reported: %q", res.Stdout)
	}
	if !connScalar[bool](t, c, `SELECT indisvalid FROM pg_index WHERE indexrelid = 't_v_idx'::regclass`) {
		t.Fatal("t_v_idx is not valid")
	}
	if n := connScalar[int64](t, c, `SELECT count(*) FROM pg_index WHERE indrelid = 't'::regclass AND NOT indisvalid`); n != 0 {
		t.Fatalf("%d INVALID indexes left", n)
	}
}

// TestEverydayExecFailureStopsAndCleansUp: a unique concurrent build on
// duplicate data fails; exec says which statement, leaves no INVALID index
// and runs nothing after it.
func TestEverydayExecFailureStopsAndCleansUp(t *testing.T) {
	dsn, c := setupExecTable(t)
	file := writeSQL(t, "bad.sql", `CREATE TABLE ok_before (id int);

CREATE UNIQUE INDEX CONCURRENTLY t_v_uniq
  ON t (v);
CREATE TABLE never_created (id int);
`)
	res := runCLI(t, fastExit(), "--dsn", dsn, "--log-format", "json", "exec", "--lock-timeout", "1s", file)
	if res.Code == 0 {
		t.Fatalf("exec succeeded on duplicate data:\n%s", res.Stdout)
	}
	if !strings.Contains(res.Stderr, "statement 2 (line 3: CREATE UNIQUE INDEX CONCURRENTLY t_v_uniq)") ||
		!strings.Contains(res.Stderr, "23505") {
		t.Fatalf("the error does not name the statement:\n%s", res.Stderr)
	}
	if n := connScalar[int64](t, c, `SELECT count(*) FROM pg_index WHERE indrelid = 't'::regclass AND NOT indisvalid`); n != 0 {
		t.Fatalf("%d INVALID indexes left", n)
	}
	if !connScalar[bool](t, c, `SELECT to_regclass('ok_before') IS NOT NULL AND to_regclass('never_created') IS NULL AND to_regclass('t_v_uniq') IS NULL`) {
		t.Fatal("statements before the failure should have run and those after it not")
	}
}

// TestEverydayExecContractGuardWithoutExtension: without pg_stat_statements
// exec says the guard could not look, and runs the DROP COLUMN.
func TestEverydayExecContractGuardWithoutExtension(t *testing.T) {
	dsn, c := setupExecTable(t)
	file := writeSQL(t, "contract.sql", "ALTER TABLE t DROP COLUMN payload;\n")
	res := runCLI(t, fastExit(), "--dsn", dsn, "--log-format", "json", "exec", "--strict", file)
	if res.Code != 0 || !strings.Contains(res.Stderr, "pg_stat_statements is not installed") {
		t.Fatalf("exec: %d\n%s\n%s", res.Code, res.Stdout, res.Stderr)
	}
	if connScalar[bool](t, c, `SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'payload' AND NOT attisdropped)`) {
		t.Fatal("payload was not dropped")
	}
}

// TestEverydayExecContractGuardWithPgStatStatements: on a server with
// pg_stat_statements loaded, a DROP COLUMN of a column that recorded queries
// read is refused with --strict and warned about without it.
func TestEverydayExecContractGuardWithPgStatStatements(t *testing.T) {
	ctx := context.Background()
	srv := ownCluster(t, "with pg_stat_statements loaded", map[string]string{
		"shared_preload_libraries": "'pg_stat_statements'",
	})
	dsn := srv.AdminDSN
	c, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	if _, err := c.Exec(ctx, `CREATE EXTENSION pg_stat_statements;
		CREATE TABLE orders (id int PRIMARY KEY, customer_name text, note text);
		INSERT INTO orders VALUES (1, 'a', 'b')`); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		var s string
		if err := c.QueryRow(ctx, `SELECT customer_name FROM orders WHERE id = $1`, 1).Scan(&s); err != nil {
			t.Fatal(err)
		}
	}
	file := writeSQL(t, "contract.sql", "ALTER TABLE orders DROP COLUMN customer_name, DROP COLUMN note;\n")
	res := runCLI(t, fastExit(), "--dsn", dsn, "--log-format", "json", "exec", "--strict", file)
	if res.Code == 0 || !strings.Contains(res.Stderr, "contract guard") || !strings.Contains(res.Stderr, "orders.customer_name") {
		t.Fatalf("--strict did not refuse:\n%s\n%s", res.Stdout, res.Stderr)
	}
	if strings.Contains(res.Stderr, "orders.note") {
		t.Fatalf("note was never read, yet flagged:\n%s", res.Stderr)
	}
	if n := connScalar[int64](t, c, `SELECT count(*) FROM pg_attribute WHERE attrelid = 'orders'::regclass AND attname IN ('customer_name', 'note') AND NOT attisdropped`); n != 2 {
		t.Fatalf("--strict refused but %d of the 2 columns remain", n)
	}
	res = runCLI(t, fastExit(), "--dsn", dsn, "--log-format", "json", "exec", file)
	if res.Code != 0 || !strings.Contains(res.Stderr, `"level":"warn"`) || !strings.Contains(res.Stderr, "orders.customer_name") ||
		!strings.Contains(res.Stderr, "shorter than --window") {
		t.Fatalf("without --strict: want a warning and success:\n%s\n%s", res.Stdout, res.Stderr)
	}
	if n := connScalar[int64](t, c, `SELECT count(*) FROM pg_attribute WHERE attrelid = 'orders'::regclass AND attname IN ('customer_name', 'note') AND NOT attisdropped`); n != 0 {
		t.Fatalf("%d columns remain after the non-strict run", n)
	}
}
