package integration

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/integration/pgtest"
	"github.com/shadowctl/shadowctl/lock"
)

// lockProc is a `shadowctl lock` run in the background.
type lockProc struct {
	cmd            *exec.Cmd
	stdout, stderr bytes.Buffer
	done           chan struct{}
	code           int
}

func lockStart(t *testing.T, env []string, args ...string) *lockProc {
	t.Helper()
	p := &lockProc{done: make(chan struct{})}
	p.cmd = exec.Command(shadowctlBinary(t), args...)
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = &p.stdout, &p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		err := p.cmd.Wait()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			p.code = ee.ExitCode()
		} else if err != nil {
			p.code = -2
		}
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// wait returns the run's result, failing the test after timeout.
func (p *lockProc) wait(t *testing.T, timeout time.Duration) cliResult {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(timeout):
		t.Fatalf("shadowctl %v still running after %s; stderr so far:\n%s", p.cmd.Args[1:], timeout, p.stderrSoFar())
	}
	return cliResult{Code: p.code, Stdout: p.stdout.String(), Stderr: p.stderr.String()}
}

func (p *lockProc) stderrSoFar() string {
	select {
	case <-p.done:
		return p.stderr.String()
	default:
		return "(still running)"
	}
}

func lockFileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

func lockRead(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestLockCLIExitStatus(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	for _, tc := range []struct {
		args []string
		want int
	}{
		{[]string{"--", "sh", "-c", "exit 3"}, 3},
		{[]string{"--", "true"}, 0},
		{[]string{"--key", "other", "--", "sh", "-c", "kill -9 $$"}, 128 + 9},
		{[]string{"--", "/nonexistent/command"}, 127},
		{[]string{}, 64},
		{[]string{"--wait", "-1s", "--", "true"}, 64},
	} {
		r := runCLI(t, nil, append([]string{"--dsn", dsn, "lock"}, tc.args...)...)
		if r.Code != tc.want {
			t.Errorf("lock %v exited %d, want %d; stderr:\n%s", tc.args, r.Code, tc.want, r.Stderr)
		}
	}
	// The command's output passes through.
	r := runCLI(t, nil, "--dsn", dsn, "lock", "--", "sh", "-c", "echo out; echo err >&2")
	if r.Code != 0 || r.Stdout != "out\n" || !strings.Contains(r.Stderr, "err\n") {
		t.Fatalf("output: code %d stdout %q stderr %q", r.Code, r.Stdout, r.Stderr)
	}
}

// Two runs on one key: one command at a time, the other waits its turn; a
// third with a short --wait exits 75 naming the holder.
func TestLockCLIMutualExclusion(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	obs := lockObserver(t, dsn)
	dir := t.TempDir()
	const key = "deploy"
	script := `echo "start $ID" >> "$DIR/log"; touch "$DIR/$ID.running"
while [ ! -e "$DIR/$ID.go" ]; do sleep 0.02; done
echo "end $ID" >> "$DIR/log"; rm "$DIR/$ID.running"`
	run := func(id string, wait string) *lockProc {
		return lockStart(t, []string{"DIR=" + dir, "ID=" + id}, "--dsn", dsn, "lock", "--key", key, "--wait", wait, "--", "sh", "-c", script)
	}
	a, b := run("a", "60s"), run("b", "60s")
	procs := map[string]*lockProc{"a": a, "b": b}

	var first, second string
	lockPollUntil(t, 20*time.Second, "one command runs", func() bool {
		switch {
		case lockFileExists(filepath.Join(dir, "a.running")):
			first, second = "a", "b"
		case lockFileExists(filepath.Join(dir, "b.running")):
			first, second = "b", "a"
		}
		return first != ""
	})
	lockPollUntil(t, 20*time.Second, "the other run queues for the lock", func() bool { return lockWaiters(t, obs, lock.KeyFor(key)) == 1 })
	if lockFileExists(filepath.Join(dir, second+".running")) {
		t.Fatalf("both commands run at once")
	}
	holders := lockHolders(t, obs, lock.KeyFor(key))
	if len(holders) != 1 {
		t.Fatalf("holders: %+v", holders)
	}

	// A third run that may wait only briefly gives up with 75 and names the holder.
	start := time.Now()
	c := runCLI(t, []string{"DIR=" + dir, "ID=c"}, "--dsn", dsn, "lock", "--key", key, "--wait", "300ms", "--", "sh", "-c", script)
	if c.Code != 75 {
		t.Fatalf("third run exited %d, want 75; stderr:\n%s", c.Code, c.Stderr)
	}
	t.Logf("held run's stderr:\n%s", c.Stderr)
	if time.Since(start) < 300*time.Millisecond {
		t.Fatalf("third run gave up after %v, before its --wait", time.Since(start))
	}
	for _, want := range []string{fmt.Sprintf("pid %d", holders[0].PID), `application "shadowctl lock deploy"`, "client ", "holding since", "exit 75"} {
		if !strings.Contains(c.Stderr, want) {
			t.Errorf("held message lacks %q:\n%s", want, c.Stderr)
		}
	}
	if lockFileExists(filepath.Join(dir, "c.running")) || strings.Contains(lockRead(t, filepath.Join(dir, "log")), "start c") {
		t.Fatal("the third run's command ran without the lock")
	}

	// Let the first finish: the second gets the lock and runs.
	if err := os.WriteFile(filepath.Join(dir, first+".go"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if r := procs[first].wait(t, 20*time.Second); r.Code != 0 {
		t.Fatalf("first run exited %d: %s", r.Code, r.Stderr)
	}
	lockPollUntil(t, 20*time.Second, "the second command runs", func() bool { return lockFileExists(filepath.Join(dir, second+".running")) })
	if err := os.WriteFile(filepath.Join(dir, second+".go"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if r := procs[second].wait(t, 20*time.Second); r.Code != 0 {
		t.Fatalf("second run exited %d: %s", r.Code, r.Stderr)
	}
	want := fmt.Sprintf("start %s\nend %s\nstart %s\nend %s\n", first, first, second, second)
	if got := lockRead(t, filepath.Join(dir, "log")); got != want {
		t.Fatalf("commands overlapped:\n%s\nwant:\n%s", got, want)
	}
	if hs := lockHolders(t, obs, lock.KeyFor(key)); len(hs) != 0 {
		t.Fatalf("lock still held after both runs: %+v", hs)
	}
}

// SIGKILL on the holding shadowctl ends its session: a waiter gets the lock
// within 2 seconds, and the orphaned command is sent SIGTERM.
func TestLockCLIKilledHolderLetsWaiterIn(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	obs := lockObserver(t, dsn)
	dir := t.TempDir()
	env := []string{"DIR=" + dir}
	a := lockStart(t, env, "--dsn", dsn, "lock", "--", "sh", "-c",
		`trap 'echo got-term > "$DIR/a.term"; exit 0' TERM; touch "$DIR/a.running"; while :; do sleep 0.05; done`)
	lockPollUntil(t, 20*time.Second, "the holder's command runs", func() bool { return lockFileExists(filepath.Join(dir, "a.running")) })
	b := lockStart(t, env, "--dsn", dsn, "lock", "--wait", "60s", "--", "sh", "-c", `touch "$DIR/b.ran"`)
	lockPollUntil(t, 20*time.Second, "the waiter queues", func() bool { return lockWaiters(t, obs, lock.KeyFor("migrations")) == 1 })

	if err := a.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	lockPollUntil(t, 10*time.Second, "the waiter's command runs", func() bool { return lockFileExists(filepath.Join(dir, "b.ran")) })
	took := time.Since(killed)
	t.Logf("waiter ran its command %v after the holder was killed", took)
	if took > 2*time.Second {
		t.Fatalf("waiter took %v after SIGKILL of the holder, want < 2s", took)
	}
	if r := b.wait(t, 20*time.Second); r.Code != 0 {
		t.Fatalf("waiter exited %d: %s", r.Code, r.Stderr)
	}
	if r := a.wait(t, 10*time.Second); r.Code != -1 {
		t.Fatalf("killed holder: code %d", r.Code)
	}
	lockPollUntil(t, 10*time.Second, "the orphaned command gets SIGTERM", func() bool { return lockFileExists(filepath.Join(dir, "a.term")) })
}

func TestLockCLIForwardsSIGTERM(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	obs := lockObserver(t, dsn)
	dir := t.TempDir()
	p := lockStart(t, []string{"FILE=" + filepath.Join(dir, "term"), "READY=" + filepath.Join(dir, "ready")},
		"--dsn", dsn, "lock", "--key", "sig", "--", "sh", "-c",
		`trap 'echo got-term > "$FILE"; exit 7' TERM; touch "$READY"; while :; do sleep 0.05; done`)
	lockPollUntil(t, 20*time.Second, "the command is ready", func() bool { return lockFileExists(filepath.Join(dir, "ready")) })
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	r := p.wait(t, 20*time.Second)
	if r.Code != 7 {
		t.Fatalf("exit %d, want the command's 7; stderr:\n%s", r.Code, r.Stderr)
	}
	if got := strings.TrimSpace(lockRead(t, filepath.Join(dir, "term"))); got != "got-term" {
		t.Fatalf("term file holds %q", got)
	}
	if hs := lockHolders(t, obs, lock.KeyFor("sig")); len(hs) != 0 {
		t.Fatalf("lock still held: %+v", hs)
	}
}

// The lock's backend is terminated while the command runs: shadowctl says so,
// sends SIGTERM to the command and exits 76.
func TestLockCLILostLockStopsCommand(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	obs := lockObserver(t, dsn)
	dir := t.TempDir()
	p := lockStart(t, []string{"DIR=" + dir}, "--dsn", dsn, "lock", "--key", "fragile", "--", "sh", "-c",
		`trap 'echo got-term > "$DIR/term"; exit 0' TERM; touch "$DIR/ready"; while :; do sleep 0.05; done`)
	lockPollUntil(t, 20*time.Second, "the command is ready", func() bool { return lockFileExists(filepath.Join(dir, "ready")) })
	hs := lockHolders(t, obs, lock.KeyFor("fragile"))
	if len(hs) != 1 {
		t.Fatalf("holders %+v", hs)
	}
	if _, err := obs.Exec(context.Background(), `SELECT pg_terminate_backend($1)`, hs[0].PID); err != nil {
		t.Fatal(err)
	}
	r := p.wait(t, 20*time.Second)
	if r.Code != 76 {
		t.Fatalf("exit %d, want 76; stderr:\n%s", r.Code, r.Stderr)
	}
	t.Logf("lost run's stderr:\n%s", r.Stderr)
	if !lockFileExists(filepath.Join(dir, "term")) {
		t.Fatal("the command was not sent SIGTERM")
	}
	for _, want := range []string{"LOCK LOST", "was lost while the command ran"} {
		if !strings.Contains(r.Stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, r.Stderr)
		}
	}
}

func TestLockCLINeverShowsPassword(t *testing.T) {
	const secret = "s3cr3t-L0ck-pw"
	// Connection refused: exit 69, no password.
	r := runCLI(t, nil, "--dsn", "postgres://alice:"+secret+"@127.0.0.1:1/nodb?sslmode=disable&connect_timeout=2", "lock", "--", "true")
	if r.Code != 69 || strings.Contains(r.Stdout+r.Stderr, secret) || !strings.Contains(r.Stderr, "shadowctl:") {
		t.Fatalf("code %d, output:\n%s%s", r.Code, r.Stdout, r.Stderr)
	}
}
