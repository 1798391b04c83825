package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// alterSpec is the change every copy-and-swap scenario makes.
const alterSpec = "ALTER COLUMN amount TYPE numeric(12,2), ALTER COLUMN id TYPE bigint"

// cliResult is one shadowctl invocation.
type cliResult struct {
	args     []string
	exit     int // -1: did not start
	stdout   string
	stderr   string
	dur      time.Duration
	maxRSSKB int64
	startErr error
	timedOut time.Duration // non-zero: stopped after this limit
	// events are the log lines the command wrote to stderr, each stamped
	// when the bench read it: zerolog's own timestamps are whole seconds,
	// too coarse to cut the workload's log by the command's steps.
	events []stampedLine
}

// stampedLine is one line of a command's output and when it arrived.
type stampedLine struct {
	at   time.Time
	text string
}

// lineStamper is an io.Writer that keeps every complete line written to it
// with the time it arrived.
type lineStamper struct {
	mu      sync.Mutex
	partial []byte
	lines   []stampedLine
}

func (s *lineStamper) Write(p []byte) (int, error) {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.partial = append(s.partial, p...)
	for {
		i := bytes.IndexByte(s.partial, '\n')
		if i < 0 {
			break
		}
		s.lines = append(s.lines, stampedLine{at: now, text: string(s.partial[:i])})
		s.partial = s.partial[i+1:]
	}
	return len(p), nil
}

// stamped returns the lines so far.
func (s *lineStamper) stamped() []stampedLine {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.lines)
}

func (r cliResult) ok() bool { return r.exit == 0 }

// notImplemented reports whether the binary does not have the command or flag
// (urfave/cli's messages), as opposed to a command that ran and failed.
func (r cliResult) notImplemented() bool {
	for _, s := range []string{"No help topic", "unknown command", "flag provided but not defined", "not implemented"} {
		if strings.Contains(r.stderr, s) || strings.Contains(r.stdout, s) {
			return true
		}
	}
	return false
}

// reason says why a figure resting on this invocation is not measured.
func (r cliResult) reason() string {
	cmd := "shadowctl"
	if len(r.args) > 0 {
		cmd += " " + r.args[0]
	}
	if r.startErr != nil {
		return fmt.Sprintf("%s could not run: %v", cmd, r.startErr)
	}
	msg := lastMessage(r.stderr)
	if msg == "" {
		msg = lastMessage(r.stdout)
	}
	if r.timedOut > 0 {
		return fmt.Sprintf("%s did not finish within %s (stopped)", cmd, r.timedOut)
	}
	if r.notImplemented() {
		return fmt.Sprintf("%s is not implemented in this build (%s)", cmd, msg)
	}
	return fmt.Sprintf("%s failed (exit %d): %s", cmd, r.exit, msg)
}

// lastMessage picks the error line the CLI prints ("shadowctl: ..."), else the
// last non-empty line.
func lastMessage(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.HasPrefix(lines[i], "shadowctl: ") {
			return strings.TrimSpace(strings.TrimPrefix(lines[i], "shadowctl: "))
		}
	}
	for i := len(lines) - 1; i >= 0; i-- {
		if l := strings.TrimSpace(lines[i]); l != "" {
			if len(l) > 300 {
				l = l[:300] + "…"
			}
			return l
		}
	}
	return ""
}

// shadowctl runs the binary under test against the bench database, in the
// foreground, keeping its output in the work folder, with its peak RSS
// (runMeasured).
func (b *bench) shadowctl(ctx context.Context, label string, args ...string) cliResult {
	r := cliResult{args: args, exit: -1}
	full := append([]string{"--dsn", b.dsn}, args...)
	cmd := exec.CommandContext(ctx, b.cfg.Bin, full...)
	cmd.Cancel = func() error { return cmd.Process.Signal(syscall.SIGTERM) }
	cmd.WaitDelay = 20 * time.Second
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	var out, errb bytes.Buffer
	var stamper lineStamper
	cmd.Stdout, cmd.Stderr = &out, io.MultiWriter(&errb, &stamper)
	start := time.Now()
	peakKB, err := runMeasured(cmd)
	r.dur = time.Since(start)
	r.stdout, r.stderr = out.String(), errb.String()
	r.events = stamper.stamped()
	if cmd.ProcessState != nil {
		r.exit = cmd.ProcessState.ExitCode()
		r.maxRSSKB = peakKB
	} else if err != nil {
		r.startErr = err
	}
	_ = os.WriteFile(filepath.Join(b.work, "shadowctl-"+label+".out"),
		[]byte(fmt.Sprintf("$ shadowctl %s\nexit %d after %s, peak RSS %.1f MB\n--- stdout\n%s\n--- stderr\n%s\n",
			strings.Join(args, " "), r.exit, r.dur, float64(r.maxRSSKB)/1024, r.stdout, r.stderr)), 0o644)
	return r
}

// shadowctlWithin is shadowctl with a time limit; past it the process gets
// SIGTERM and the result says it timed out.
func (b *bench) shadowctlWithin(ctx context.Context, limit time.Duration, label string, args ...string) cliResult {
	cctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	r := b.shadowctl(cctx, label, args...)
	if ctx.Err() == nil && cctx.Err() != nil {
		r.timedOut = limit
	}
	return r
}

// status runs `status ID --json` and decodes it as a loose JSON object.
func (b *bench) status(ctx context.Context, id string) (map[string]any, cliResult) {
	r := b.shadowctl(ctx, "status-"+id, "status", id, "--json")
	if !r.ok() {
		return nil, r
	}
	if m := decodeObject(r.stdout); m != nil {
		return m, r
	}
	r.exit, r.stderr = 1, "status --json printed no JSON object: "+tail(r.stdout, 200)
	return nil, r
}

// decodeObject decodes the whole output, else its last line that is an object.
func decodeObject(s string) map[string]any {
	var m map[string]any
	if json.Unmarshal([]byte(strings.TrimSpace(s)), &m) == nil {
		return m
	}
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if json.Unmarshal([]byte(lines[i]), &m) == nil {
			return m
		}
	}
	return nil
}

// num reads a number at a path of keys, tolerating absent keys, nulls and
// numbers sent as strings.
func num(m map[string]any, path ...string) (float64, bool) {
	var cur any = m
	for _, k := range path {
		obj, ok := cur.(map[string]any)
		if !ok {
			return 0, false
		}
		if cur, ok = obj[k]; !ok {
			return 0, false
		}
	}
	switch v := cur.(type) {
	case float64:
		return v, true
	case string:
		var f float64
		if _, err := fmt.Sscanf(v, "%g", &f); err == nil {
			return f, true
		}
	}
	return 0, false
}

func str(m map[string]any, key string) string {
	if s, ok := m[key].(string); ok {
		return s
	}
	return ""
}

// hasCommand probes the binary for a command: urfave/cli answers an unknown
// one with "No help topic" and a non-zero exit.
func (b *bench) hasCommand(ctx context.Context, name string) (bool, string) {
	r := b.shadowctl(ctx, "probe-"+name, name, "--help")
	if r.ok() {
		return true, ""
	}
	return false, r.reason()
}

// hwmEvery is how often runMeasured reads the child's high-water mark.
const hwmEvery = 10 * time.Millisecond

// runMeasured runs cmd (Start, then Wait) and returns the largest resident
// set of the child's own address space in KiB: the kernel's high-water mark
// (VmHWM in /proc/PID/status), read every hwmEvery until the child exits.
// Not the child's rusage: ru_maxrss takes in, at exec, the address space the
// child was started from, which is the bench's own. The bench holds the
// workload's transaction logs, and once it had grown past 48 MB every
// shadowctl process read 48.3 MB that way, a 20 ms `init` included. Growth
// in a child's last hwmEvery goes unseen.
func runMeasured(cmd *exec.Cmd) (peakKB int64, err error) {
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	path := fmt.Sprintf("/proc/%d/status", cmd.Process.Pid)
	stop, peak := make(chan struct{}), make(chan int64, 1)
	go func() {
		var kb int64
		t := time.NewTicker(hwmEvery)
		defer t.Stop()
		for {
			kb = max(kb, readHWM(path))
			select {
			case <-stop:
				peak <- kb
				return
			case <-t.C:
			}
		}
	}()
	err = cmd.Wait()
	close(stop)
	return <-peak, err
}

// readHWM reads VmHWM (KiB) from a /proc/PID/status file; 0 once the
// process is gone.
func readHWM(path string) int64 {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb
		}
	}
	return 0
}
