package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/internal/daemon"
	"github.com/shadowctl/shadowctl/shadow"
)

// readEnvFile reads KEY=VALUE lines written by `env`.
func readEnvFile(t testing.TB, path string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("hook output: %v", err)
	}
	out := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			out[k] = v
		}
	}
	return out
}

// Issue 5, done-when 5: a failing before-cutover hook vetoes the automatic
// cutover (recorded as an event; blue keeps serving); the other hooks get
// the documented variables.
func TestDaemonHooksAndBeforeCutoverVeto(t *testing.T) {
	// The daemon's password-bearing variables never reach a hook.
	t.Setenv("SHADOWCTL_DSN", "postgres://app:hunter2@db.invalid/app")
	t.Setenv("PGPASSWORD", "hunter2")
	db := newTestDB(t)
	const rows = 3000
	db.createOrders(rows)
	dir := t.TempDir()
	record := fmt.Sprintf(`env | grep -E '^(SHADOWCTL_|PGPASSWORD)' > '%s'/"$SHADOWCTL_EVENT".env`, dir)
	hooks := map[string]string{}
	for _, ev := range []string{"started", "copy-done", "verified", "ready", "cut-over", "finalized"} {
		hooks[ev] = record
	}
	hooks["before-cutover"] = record + `; echo "not during the sale"; exit 3`
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)",
		CutoverPolicy: shadow.CutoverAuto, Hooks: hooks})
	if err != nil {
		t.Fatal(err)
	}
	d := db.startDaemon(daemon.Config{RetryAfter: time.Hour})
	waitTrue(t, 60*time.Second, "the veto", func() bool { return len(db.events(m.ID, "cutover_vetoed")) > 0 })
	d.waitScans(t, 3)
	cur := db.migration(m.ID)
	if cur.Phase != shadow.Ready {
		t.Fatalf("phase %s after the veto, want ready", cur.Phase)
	}
	if kind := scalar[string](db, `SELECT relkind::text FROM pg_class WHERE oid = 'public.orders'::regclass`); kind != "r" {
		t.Fatalf("public.orders relkind %s after the veto, want r", kind)
	}
	veto := db.events(m.ID, "cutover_vetoed")
	if len(veto) != 1 || !strings.Contains(veto[0].Message, "exit 3") || !strings.Contains(veto[0].Message, "not during the sale") {
		t.Fatalf("veto events %+v: want one naming exit 3 and the hook's output", veto)
	}
	if n := len(db.events(m.ID, "cutover_attempt")); n != 0 {
		t.Fatalf("%d cutover attempts after a veto, want 0", n)
	}
	want := map[string]string{"started": "preparing", "copy-done": "verifying", "verified": "ready", "ready": "ready", "before-cutover": "ready"}
	for ev, phase := range want {
		env := readEnvFile(t, filepath.Join(dir, ev+".env"))
		for k, v := range map[string]string{
			"SHADOWCTL_MIGRATION_ID": m.ID, "SHADOWCTL_TABLE": `"public"."orders"`, "SHADOWCTL_PHASE": phase,
			"SHADOWCTL_EVENT": ev, "SHADOWCTL_ROWS_COPIED": fmt.Sprint(rows), "SHADOWCTL_ERROR": "",
		} {
			got, ok := env[k]
			if ev == "started" && k == "SHADOWCTL_ROWS_COPIED" {
				continue // fired after the drive; counts are the current ones
			}
			if !ok || got != v {
				t.Errorf("hook %s: %s=%q (set: %v), want %q", ev, k, got, ok, v)
			}
		}
		if _, leaked := env["SHADOWCTL_DSN"]; leaked || env["PGPASSWORD"] != "" {
			t.Errorf("hook %s got the daemon's DSN or password: %v", ev, env)
		}
		if env["SHADOWCTL_ROWS_ESTIMATED"] == "" || env["SHADOWCTL_ROWS_ESTIMATED"] == "0" {
			t.Errorf("hook %s: SHADOWCTL_ROWS_ESTIMATED=%q", ev, env["SHADOWCTL_ROWS_ESTIMATED"])
		}
	}
	// postpone, then resume: the hold is recorded with its actor.
	env := []string{"SHADOWCTL_DSN=" + db.DSN}
	for _, cmd := range []string{"postpone", "resume"} {
		if res := runCLI(t, env, cmd, m.ID); res.Code != 0 {
			t.Fatalf("%s: exit %d: %s", cmd, res.Code, res.Stderr)
		}
	}
	// Changes made by hand from the CLI fire their hooks too (the daemon
	// follows the audit log with a cursor in the catalog).
	for _, args := range [][]string{{"cutover", m.ID}, {"finalize", "--force", m.ID}} {
		if res := runCLI(t, env, args...); res.Code != 0 {
			t.Fatalf("%v: exit %d: %s", args, res.Code, res.Stderr)
		}
	}
	for ev, phase := range map[string]string{"cut-over": "cut_over", "finalized": "finalized"} {
		path := filepath.Join(dir, ev+".env")
		waitTrue(t, 30*time.Second, "the "+ev+" hook", func() bool { _, err := os.Stat(path); return err == nil })
		waitTrue(t, 30*time.Second, "the "+ev+" hook's output", func() bool { return readEnvFile(t, path)["SHADOWCTL_EVENT"] == ev })
		if got := readEnvFile(t, path); got["SHADOWCTL_PHASE"] != phase || got["SHADOWCTL_MIGRATION_ID"] != m.ID {
			t.Fatalf("hook %s: %v", ev, got)
		}
	}
	// A hook's event is recorded after its command exits, so its output file
	// appears first: wait for the record, then check there is exactly one each.
	waitTrue(t, 30*time.Second, "the hook runs to be recorded", func() bool { return len(db.events(m.ID, "hook")) >= 7 })
	if n := len(db.events(m.ID, "hook")); n != 7 {
		t.Fatalf("%d hook runs, want 7 (each hook once)", n)
	}
	res := runCLI(t, env, "events", m.ID)
	for _, kind := range []string{"claimed", "hook", "cutover_vetoed", "postpone", "resume", "finalize"} {
		if !strings.Contains(res.Stdout, kind) {
			t.Fatalf("events output lacks %s:\n%s", kind, res.Stdout)
		}
	}
}
