package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/shadow"
)

// Issue 3, done-when 3: `shadowctl start` is killed (SIGKILL) mid-backfill;
// the triggers keep green current while no process runs; `shadowctl drive`
// continues from the checkpoints — it reads exactly the rows after each
// range's checkpoint, never a finished range again — and green ends exact.
// While it runs, a second driver of the same migration is refused with
// ErrClaimed.
func TestIssue3KillMidBackfillAndResume(t *testing.T) {
	db := newTestDB(t)
	const rows, batch = 20000, 250
	createItems(db, "items", rows)
	ctx := context.Background()
	bin := shadowctlBinary(t)
	const id = "resume-me"

	start := exec.Command(bin, "--dsn", db.DSN, "--log-level", "warn", "start", "--table", "items",
		"--alter", "ALTER COLUMN n TYPE bigint", "--batch-size", "250", "--max-rows-per-second", "5000",
		"--workers", "1", "--name", id, "--no-progress")
	var startErr bytes.Buffer
	start.Stderr = &startErr
	if err := start.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- start.Wait() }()

	progress := func() (copied int64, err error) {
		err = db.Pool.QueryRow(ctx, `SELECT coalesce(sum(rows_copied), 0)::bigint FROM shadowctl.copy_ranges WHERE migration_id = $1`, id).Scan(&copied)
		if pgsql.Code(err) == pgsql.CodeUndefinedTable || (err != nil && strings.Contains(err.Error(), "does not exist")) {
			return 0, nil // the catalog is not created yet
		}
		return copied, err
	}
	waitFor(t, "the copy to be under way", 60*time.Second, func() (bool, error) {
		select {
		case err := <-exited:
			return false, errors.New("start exited before it was killed: " + errorString(err) + ": " + startErr.String())
		default:
		}
		n, err := progress()
		return n >= 6000, err // the first range (5000 rows) is done, the second under way
	})
	if err := start.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-exited
	// The server notices the dead connections; the claim ends with them.
	waitFor(t, "the killed process's sessions to end", 20*time.Second, func() (bool, error) {
		var n int
		err := db.Pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE 'shadowctl%'`).Scan(&n)
		return n == 0, err
	})
	atKill, err := progress()
	if err != nil {
		t.Fatal(err)
	}
	m, err := db.Runner.Store.Get(ctx, db.Pool, id)
	if err != nil {
		t.Fatal(err)
	}
	if m.Phase != shadow.Copying || atKill <= 0 || atKill >= rows {
		t.Fatalf("killed in %s with %d of %d rows copied: not mid-backfill", m.Phase, atKill, rows)
	}

	// No process drives the migration; the triggers keep green current.
	db.exec(`DELETE FROM items WHERE id % 100 = 0`,
		`UPDATE items SET v = 'changed while no driver ran' WHERE id % 70 = 0`,
		`UPDATE items SET id = id + 100000 WHERE id % 90 = 2`,
		`INSERT INTO items SELECT 2 * g + 1, 'new', g FROM generate_series(1, 20000, 7) g`)

	// What resume has to read: the rows after each unfinished range's checkpoint.
	toRead := scalar[int64](db, `SELECT coalesce(sum((SELECT count(*) FROM items b
		WHERE (coalesce(r.last_key, r.lower_key) IS NULL OR b.id > (coalesce(r.last_key, r.lower_key))[1]::int)
		  AND (r.upper_key IS NULL OR b.id <= r.upper_key[1]::int))), 0)::bigint
		FROM shadowctl.copy_ranges r WHERE r.migration_id = $1 AND NOT r.done`, id)

	blueRows := scalar[int64](db, `SELECT count(*) FROM items`)
	resume := exec.Command(bin, "--dsn", db.DSN, "--log-level", "debug", "--log-format", "json", "drive", "--no-progress", id)
	var resumeOut, resumeErr bytes.Buffer
	resume.Stdout, resume.Stderr = &resumeOut, &resumeErr
	if err := resume.Start(); err != nil {
		t.Fatal(err)
	}
	resumed := make(chan error, 1)
	go func() { resumed <- resume.Wait() }()

	// A second driver while resume holds the claim.
	waitFor(t, "resume to claim the migration", 30*time.Second, func() (bool, error) {
		select {
		case err := <-resumed:
			return false, errors.New("resume exited before its claim was seen: " + errorString(err) + ": " + resumeErr.String())
		default:
		}
		var n int
		err := db.Pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'advisory' AND l.granted
			WHERE a.application_name = 'shadowctl driver ' || $1`, id).Scan(&n)
		return n > 0, err
	})
	if n, err := progress(); err != nil || n < atKill {
		t.Fatalf("rows copied right after the restart: %d (%v), below %d at the kill: the checkpoints were lost", n, err, atKill)
	}
	second := *db.Runner
	second.ClaimWait = 200 * time.Millisecond
	if _, err := second.Drive(ctx, id, shadow.Ready); !errors.Is(err, shadow.ErrClaimed) {
		t.Fatalf("second driver: %v, want ErrClaimed", err)
	}

	select {
	case err := <-resumed:
		if err != nil {
			t.Fatalf("resume: %v\n%s", err, resumeErr.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("resume did not finish")
	}
	if !strings.Contains(resumeOut.String(), "is ready") {
		t.Fatalf("resume said %q", resumeOut.String())
	}
	var resumedRows, resumedBatches int64
	sc := bufio.NewScanner(&resumeErr)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var line struct {
			Message string `json:"message"`
			Rows    int64  `json:"rows"`
		}
		if json.Unmarshal(sc.Bytes(), &line) == nil && line.Message == "batch copied" {
			resumedRows += line.Rows
			resumedBatches++
		}
	}
	t.Logf("killed at %d rows copied; resume read %d rows in %d batches (blue has %d rows: a copy from scratch takes %d batches)",
		atKill, resumedRows, resumedBatches, blueRows, blueRows/batch)
	if resumedBatches == 0 || resumedBatches >= blueRows/batch || resumedRows >= blueRows-5000 {
		t.Fatalf("resume read %d rows in %d batches: it did not skip the finished range and the checkpointed part", resumedRows, resumedBatches)
	}
	if resumedRows != toRead {
		t.Fatalf("resume read %d rows, want exactly the %d after the checkpoints", resumedRows, toRead)
	}
	if final, err := progress(); err != nil || final != atKill+resumedRows {
		t.Fatalf("rows copied %d (%v), want %d + %d", final, err, atKill, resumedRows)
	}
	db.assertGreenMatches(`SELECT id, v, n::bigint FROM public.items`, `SELECT id, v, n FROM green.items`)
}

func errorString(err error) string {
	if err == nil {
		return "exit 0"
	}
	return err.Error()
}

// An interrupted `start` (SIGINT) keeps the checkpoint and tells the operator
// how to continue or abort, naming the migration even when its id was
// generated; `shadowctl abort` then removes everything.
func TestIssue3InterruptedStartNamesResume(t *testing.T) {
	db := newTestDB(t)
	createItems(db, "items", 6000)
	ctx := context.Background()
	bin := shadowctlBinary(t)
	before := dbFingerprint(t, db, "shadowctl")
	start := exec.Command(bin, "--dsn", db.DSN, "--log-level", "warn", "start", "--table", "items",
		"--alter", "ALTER COLUMN n TYPE bigint", "--batch-size", "200", "--max-rows-per-second", "2000", "--no-progress")
	var stderr bytes.Buffer
	start.Stderr = &stderr
	if err := start.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- start.Wait() }()
	var id string
	waitFor(t, "the copy to be under way", 60*time.Second, func() (bool, error) {
		select {
		case err := <-exited:
			return false, errors.New("start exited early: " + errorString(err) + ": " + stderr.String())
		default:
		}
		err := db.Pool.QueryRow(ctx, `SELECT migration_id FROM shadowctl.copy_ranges GROUP BY 1 HAVING sum(rows_copied) > 0`).Scan(&id)
		if err != nil && (errors.Is(err, pgx.ErrNoRows) || strings.Contains(err.Error(), "does not exist")) {
			return false, nil
		}
		return err == nil, err
	})
	if err := start.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if err := <-exited; err == nil {
		t.Fatal("an interrupted start exited 0")
	}
	if msg := stderr.String(); !strings.Contains(msg, "shadowctl drive "+id) || !strings.Contains(msg, "shadowctl abort "+id) {
		t.Fatalf("the interruption message does not name `shadowctl drive %s`: %s", id, msg)
	}
	m, err := db.Runner.Store.Get(ctx, db.Pool, id)
	if err != nil {
		t.Fatal(err)
	}
	if m.Phase != shadow.Copying || m.RowsCopied == 0 {
		t.Fatalf("after the interruption: %s with %d rows copied, want copying with its checkpoint", m.Phase, m.RowsCopied)
	}
	if res := runCLI(t, nil, "--dsn", db.DSN, "abort", id); res.Code != 0 {
		t.Fatalf("abort: %d %s", res.Code, res.Stderr)
	}
	assertSameSchema(t, "after abort", before, dbFingerprint(t, db, "shadowctl"))
	assertNoToolObjects(t, db, "green")
}
