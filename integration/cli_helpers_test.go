package integration

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

var (
	binOnce sync.Once
	binPath string
	binErr  error
	binDir  string
)

// shadowctlBinary builds cmd/shadowctl once per test binary (with the race
// detector) and returns its path.
func shadowctlBinary(t testing.TB) string {
	t.Helper()
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "shadowctl-bin-")
		if binErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "shadowctl")
		out, err := exec.Command("go", "build", "-race", "-o", binPath, "../cmd/shadowctl").CombinedOutput()
		if err != nil {
			binErr = &buildError{err: err, out: string(out)}
		}
	})
	if binErr != nil {
		t.Fatalf("build shadowctl: %v", binErr)
	}
	return binPath
}

type buildError struct {
	err error
	out string
}

func (e *buildError) Error() string { return e.err.Error() + ": " + e.out }

// cliResult is one finished shadowctl run.
type cliResult struct {
	Code           int
	Stdout, Stderr string
}

// runCLI runs shadowctl with args (the DSN is passed by the caller) and waits
// for it, at most two minutes.
func runCLI(t testing.TB, env []string, args ...string) cliResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, shadowctlBinary(t), args...)
	// The race-built binary otherwise sleeps a second at every exit.
	cmd.Env = append(append(os.Environ(), "GORACE=atexit_sleep_ms=0"), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	res := cliResult{Stdout: stdout.String(), Stderr: stderr.String()}
	if err != nil {
		if ee, ok := err.(*exec.ExitError); ok {
			res.Code = ee.ExitCode()
		} else {
			t.Fatalf("run shadowctl %v: %v", args, err)
		}
	}
	return res
}
