package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/internal/catalog"
	"github.com/shadowctl/shadowctl/internal/daemon"
	"github.com/shadowctl/shadowctl/shadow"
)

// waitTrue polls cond until it is true or the deadline passes (polling the
// condition itself, never sleeping for a guessed time).
func waitTrue(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	waitUntil(t, what, timeout, cond)
}

// migration reads one migration from the catalog.
func (db *testDB) migration(id string) *shadow.Migration {
	db.t.Helper()
	m, err := db.Runner.Store.Get(context.Background(), db.Pool, id)
	if err != nil {
		db.t.Fatal(err)
	}
	return m
}

// events reads a migration's events of one kind ("" = all).
func (db *testDB) events(id, kind string) []shadow.EventRecord {
	db.t.Helper()
	evs, err := db.Runner.Store.Events(context.Background(), id)
	if err != nil {
		db.t.Fatal(err)
	}
	var out []shadow.EventRecord
	for _, e := range evs {
		if kind == "" || e.Kind == kind {
			out = append(out, e)
		}
	}
	return out
}

// claimedBy lists the daemons that claimed a migration, in order.
func (db *testDB) claimedBy(id string) []string {
	var out []string
	for _, e := range db.events(id, "claimed") {
		var d struct{ Daemon string }
		_ = json.Unmarshal(e.Data, &d)
		out = append(out, d.Daemon)
	}
	return out
}

// waitPhase waits until the migration is in phase p, failing early when it
// failed.
func (db *testDB) waitPhase(id string, p shadow.Phase, timeout time.Duration) *shadow.Migration {
	db.t.Helper()
	var m *shadow.Migration
	waitTrue(db.t, timeout, fmt.Sprintf("migration %s to be %s", id, p), func() bool {
		m = db.migration(id)
		if m.Phase == shadow.Failed && p != shadow.Failed {
			db.t.Fatalf("migration %s failed: %s", id, m.Error)
		}
		return m.Phase == p
	})
	return m
}

// inProcessDaemon runs a daemon in this process on its own runner.
type inProcessDaemon struct {
	*daemon.Daemon
	cancel context.CancelFunc
	done   chan error
}

func (db *testDB) startDaemon(cfg daemon.Config) *inProcessDaemon {
	db.t.Helper()
	log := zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr}).Level(zerolog.WarnLevel).With().Timestamp().Str("test", db.t.Name()).Logger()
	if os.Getenv("SHADOWCTL_TEST_LOG") != "" {
		log = log.Level(zerolog.DebugLevel)
	}
	cfg.Runner = shadow.NewRunner(db.Pool, catalog.New(""), log)
	cfg.Log = log
	if cfg.Poll == 0 {
		cfg.Poll = 100 * time.Millisecond
	}
	d, err := daemon.New(cfg)
	if err != nil {
		db.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &inProcessDaemon{Daemon: d, cancel: cancel, done: make(chan error, 1)}
	go func() { p.done <- d.Run(ctx) }()
	db.t.Cleanup(func() { p.stop(db.t) })
	select {
	case <-d.Ready():
	case err := <-p.done:
		db.t.Fatalf("daemon stopped at once: %v", err)
	case <-time.After(30 * time.Second):
		db.t.Fatal("daemon not ready after 30s")
	}
	return p
}

// stop cancels the daemon (as SIGTERM does) and waits for Run to return.
func (p *inProcessDaemon) stop(t testing.TB) {
	p.cancel()
	select {
	case err, ok := <-p.done:
		if ok && err != nil {
			t.Errorf("daemon: %v", err)
		}
		if ok {
			close(p.done)
		}
	case <-time.After(30 * time.Second):
		t.Error("daemon did not stop within 30s of its context ending")
	}
}

// waitScans waits until the daemon completed n more catalog scans.
func (p *inProcessDaemon) waitScans(t testing.TB, n int64) {
	t.Helper()
	target := p.Scans() + n
	p.Wake()
	waitTrue(t, 30*time.Second, "daemon scans", func() bool { return p.Scans() >= target })
}

// daemonProc is `shadowctl daemon` as a child process.
type daemonProc struct {
	cmd  *exec.Cmd
	out  *lockedBuffer
	done chan struct{}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func startDaemonProc(t testing.TB, dsn string, args ...string) *daemonProc {
	t.Helper()
	cmd := exec.Command(shadowctlBinary(t), append([]string{"--log-format", "json", "daemon"}, args...)...)
	cmd.Env = append(os.Environ(), "SHADOWCTL_DSN="+dsn)
	p := &daemonProc{cmd: cmd, out: &lockedBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.out, p.out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.kill9()
		if t.Failed() {
			t.Logf("daemon pid %d output:\n%s", cmd.Process.Pid, p.out.String())
		}
	})
	return p
}

// identity is how the daemon names itself in the catalog (host/pid).
func (p *daemonProc) identity() string {
	host, _ := os.Hostname()
	return fmt.Sprintf("%s/%d", host, p.cmd.Process.Pid)
}

// kill9 kills the daemon without warning and waits for it to be gone.
func (p *daemonProc) kill9() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.done
}

// terminate sends SIGTERM and returns the exit code.
func (p *daemonProc) terminate(t testing.TB) int {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		t.Fatal("daemon did not exit within 30s of SIGTERM")
	}
	return p.cmd.ProcessState.ExitCode()
}

// rowsCopied is the sum of the copy checkpoints.
func (db *testDB) rowsCopied(id string) int64 {
	return scalar[int64](db, `SELECT coalesce(sum(rows_copied), 0)::bigint FROM shadowctl.copy_ranges WHERE migration_id = $1`, id)
}

func hasLine(s, sub string) bool { return strings.Contains(s, sub) }

// throttledReason waits until status says why the copy is throttled and
// returns it; a migration that gets past the copy first fails the test.
func (db *testDB) throttledReason(id string) string {
	db.t.Helper()
	var reason string
	waitTrue(db.t, 30*time.Second, "status to say why the copy is throttled", func() bool {
		st := shadow.StatusOf(db.migration(id), time.Now())
		if p := st.Phase; p != string(shadow.Pending) && p != string(shadow.Preparing) && p != string(shadow.Copying) {
			db.t.Fatalf("phase %s before the copy was ever held (copied %d rows)", st.Phase, db.rowsCopied(id))
		}
		if st.Throttled != nil {
			reason = *st.Throttled
		}
		return st.Throttled != nil
	})
	return reason
}

// assertCopyHeld checks that a throttled copy stands still: its checkpoints
// stop moving for 3 s (the gate keeps checking meanwhile), with at most the
// batches already past the gate copied since held rows, and the migration
// still copying.
func (db *testDB) assertCopyHeld(id string, held int64) {
	db.t.Helper()
	waitTrue(db.t, 30*time.Second, "the checkpoints to stand still for 3 s (the gate keeps checking)", func() bool {
		return scalar[bool](db, `SELECT updated_at < now() - interval '3 seconds' FROM shadowctl.copy_ranges WHERE migration_id = $1 ORDER BY updated_at DESC LIMIT 1`, id)
	})
	if got := db.rowsCopied(id); got > held+200 || db.migration(id).Phase != shadow.Copying {
		db.t.Fatalf("the copy went on while throttled: %d → %d rows, phase %s", held, got, db.migration(id).Phase)
	}
}
