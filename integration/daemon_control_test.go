package integration

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/internal/daemon"
	"github.com/shadowctl/shadowctl/shadow"
)

// rateSample measures the copy rate from the checkpoints (copy_ranges): the
// time the copy takes to go from `from` to `from+span` rows.
func (db *testDB) rateOver(id string, from, span int64) float64 {
	db.t.Helper()
	var t0 time.Time
	var r0 int64
	waitTrue(db.t, 60*time.Second, "copy to reach the sample window", func() bool {
		r0 = db.rowsCopied(id)
		t0 = time.Now()
		return r0 >= from
	})
	var t1 time.Time
	var r1 int64
	waitTrue(db.t, 60*time.Second, "copy to cross the sample window", func() bool {
		r1 = db.rowsCopied(id)
		t1 = time.Now()
		return r1 >= r0+span
	})
	return float64(r1-r0) / t1.Sub(t0).Seconds()
}

// Issue 5, done-when 4: `shadowctl set` changes the batch size and the rate
// cap of a running copy: visible in status, in the batches and in the copy
// rate measured from the checkpoints.
func TestDaemonSetChangesRunningCopy(t *testing.T) {
	shadowctlBinary(t) // built before the clock starts
	db := newTestDB(t)
	const rows = 20000
	db.createOrders(rows)
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)",
		BatchSize: 100, MaxRowsPerSecond: 1000, Workers: 2})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	stage := 0 // 0 before the set command, 1 while it runs, 2 after
	var maxBefore, maxAfter int64
	d := db.startDaemon(daemon.Config{OnBatch: func(_ string, n int64) {
		mu.Lock()
		defer mu.Unlock()
		switch stage {
		case 0:
			maxBefore = max(maxBefore, n)
		case 2:
			maxAfter = max(maxAfter, n)
		}
	}})
	_ = d
	before := db.rateOver(m.ID, 300, 1000)

	env := []string{"SHADOWCTL_DSN=" + db.DSN}
	mu.Lock()
	stage = 1
	mu.Unlock()
	if res := runCLI(t, env, "set", m.ID, "batch_size=1000", "max_rows_per_second=5000"); res.Code != 0 {
		t.Fatalf("set: exit %d: %s", res.Code, res.Stderr)
	}
	mu.Lock()
	stage = 2
	mu.Unlock()
	res := runCLI(t, env, "status", "--json", m.ID)
	var st shadow.Status
	if err := json.Unmarshal([]byte(res.Stdout), &st); err != nil {
		t.Fatalf("status --json: %v: %s", err, res.Stdout)
	}
	if st.BatchSize != 1000 || st.MaxRowsPerSecond != 5000 || st.Phase != "copying" {
		t.Fatalf("status after set: batch_size %d, max_rows_per_second %d, phase %s", st.BatchSize, st.MaxRowsPerSecond, st.Phase)
	}
	// Skip the batches reserved at the old rate, then measure.
	after := db.rateOver(m.ID, db.rowsCopied(m.ID)+1000, 5000)
	t.Logf("copy rate: %.0f rows/s before set (cap 1000), %.0f rows/s after (cap 5000)", before, after)
	if before > 1300 || before < 600 {
		t.Fatalf("rate before set %.0f rows/s, want about 1000", before)
	}
	if after < 3000 || after > 6000 || after < 3*before {
		t.Fatalf("rate after set %.0f rows/s, want about 5000", after)
	}
	db.waitPhase(m.ID, shadow.Ready, 60*time.Second)
	mu.Lock()
	t.Logf("largest batch: %d rows before set (batch_size 100), %d after (batch_size 1000)", maxBefore, maxAfter)
	if maxBefore > 100 || maxAfter <= 100 || maxAfter > 1000 {
		mu.Unlock()
		t.Fatalf("largest batch %d before and %d after set, want <= 100 then in (100, 1000]", maxBefore, maxAfter)
	}
	mu.Unlock()
	if evs := db.events(m.ID, "set"); len(evs) != 1 || !hasLine(evs[0].Actor, "@") {
		t.Fatalf("set events %+v: want one with the OS user@host in the actor", evs)
	}
	db.assertGreenMatches(`SELECT id, amount::numeric(12,2) FROM public.orders`, `SELECT id, amount FROM green.orders`)
}

// `status --watch` redraws every second until interrupted, then exits 0.
func TestDaemonStatusWatch(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(100)
	m, err := db.Runner.Submit(context.Background(), shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)"})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(shadowctlBinary(t), "status", "--watch")
	cmd.Env = append(os.Environ(), "SHADOWCTL_DSN="+db.DSN)
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitTrue(t, 30*time.Second, "two redraws", func() bool { return strings.Count(out.String(), "migration "+m.ID) >= 2 })
	_ = cmd.Process.Signal(os.Interrupt)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("status --watch after SIGINT: %v\n%s", err, out.String())
	}
	if !strings.Contains(out.String(), "cutover:   manual") {
		t.Fatalf("status lacks the daemon's lines:\n%s", out.String())
	}
}

// pause stops a running copy at a checkpoint and the daemon lets go;
// `cutover --window` and `cutover --at` record a policy the daemon follows;
// resume lets the copy go on from its checkpoint.
func TestDaemonPauseResumeAndScheduledCutover(t *testing.T) {
	shadowctlBinary(t)
	db := newTestDB(t)
	const rows = 4000
	db.createOrders(rows)
	m, err := db.Runner.Submit(context.Background(), shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)",
		BatchSize: 100, MaxRowsPerSecond: 2000})
	if err != nil {
		t.Fatal(err)
	}
	d := db.startDaemon(daemon.Config{})
	waitTrue(t, 60*time.Second, "the copy to run", func() bool { return db.rowsCopied(m.ID) >= 500 })
	env := []string{"SHADOWCTL_DSN=" + db.DSN}
	cli := func(args ...string) string {
		t.Helper()
		res := runCLI(t, env, args...)
		if res.Code != 0 {
			t.Fatalf("%v: exit %d: %s", args, res.Code, res.Stderr)
		}
		return res.Stdout
	}
	cli("pause", m.ID)
	waitTrue(t, 30*time.Second, "the daemon to let the paused migration go", func() bool {
		st := shadow.StatusOf(db.migration(m.ID), time.Now())
		return st.Paused && st.Driver != nil && st.Driver.ReleasedAt != nil
	})
	held := db.rowsCopied(m.ID)
	d.waitScans(t, 5)
	if got := db.rowsCopied(m.ID); got != held || db.migration(m.ID).Phase != shadow.Copying {
		t.Fatalf("paused copy moved from %d to %d rows", held, got)
	}
	cli("cutover", m.ID, "--window", "Sat 02:00-03:00 Europe/Berlin")
	var st shadow.Status
	if err := json.Unmarshal([]byte(cli("status", "--json", m.ID)), &st); err != nil {
		t.Fatal(err)
	}
	if st.CutoverPolicy != "window" || st.CutoverWindow == nil || *st.CutoverWindow != "Sat 02:00-03:00 Europe/Berlin" ||
		st.NextWindow == nil || st.NextWindow.Start.Weekday() != time.Saturday {
		t.Fatalf("status after cutover --window: policy %s, window %v, next %+v", st.CutoverPolicy, st.CutoverWindow, st.NextWindow)
	}
	cli("resume", m.ID)
	db.waitPhase(m.ID, shadow.Ready, 60*time.Second)
	if got := db.rowsCopied(m.ID); got != rows {
		t.Fatalf("%d rows counted after resume, want %d", got, rows)
	}
	// A time in the past: due now.
	cli("cutover", m.ID, "--at", time.Now().Add(-time.Minute).UTC().Format(time.RFC3339))
	db.waitPhase(m.ID, shadow.CutOver, 30*time.Second)
	kinds := map[string]int{}
	for _, e := range db.events(m.ID, "") {
		kinds[e.Kind]++
	}
	if kinds["pause"] != 1 || kinds["resume"] != 1 || kinds["cutover_policy"] != 2 || kinds["cutover_attempt"] != 1 {
		t.Fatalf("events by kind: %v", kinds)
	}
}
