package integration

import (
	"strings"
	"testing"

	"github.com/shadowctl/shadowctl/integration/pgtest"
	"golang.org/x/sync/errgroup"
)

func TestCLIInitTwiceConcurrentlyThenNoChange(t *testing.T) {
	dsn := pgtest.NewDatabase(t)
	var g errgroup.Group
	results := make([]cliResult, 2)
	for i := range results {
		g.Go(func() error { results[i] = runCLI(t, nil, "--dsn", dsn, "init"); return nil })
	}
	_ = g.Wait()
	for i, r := range results {
		if r.Code != 0 {
			t.Fatalf("init #%d exited %d: %s", i, r.Code, r.Stderr)
		}
	}
	again := runCLI(t, nil, "--dsn", dsn, "init")
	if again.Code != 0 || !strings.Contains(again.Stdout, "up to date") {
		t.Fatalf("third init: code %d, stdout %q, stderr %q; want 'up to date'", again.Code, again.Stdout, again.Stderr)
	}
}

func TestCLIErrorNeverShowsPassword(t *testing.T) {
	const secret = "s3cr3t-Pa55word"
	// Wrong port on purpose: the connection fails and the error is printed.
	for _, dsn := range []string{
		"postgres://alice:" + secret + "@127.0.0.1:1/nodb?sslmode=disable&connect_timeout=2",
		"host=127.0.0.1 port=1 user=alice password=" + secret + " dbname=nodb connect_timeout=2",
		"postgres://alice:" + secret + "@127.0.0.1:notaport/nodb",
	} {
		r := runCLI(t, nil, "--dsn", dsn, "init")
		if r.Code == 0 {
			t.Fatalf("init against a closed port succeeded: %q", dsn)
		}
		if strings.Contains(r.Stderr+r.Stdout, secret) {
			t.Fatalf("password leaked in output:\n%s%s", r.Stdout, r.Stderr)
		}
		if !strings.Contains(r.Stderr, "shadowctl:") {
			t.Fatalf("no error printed for %q: %q", dsn, r.Stderr)
		}
		r = runCLI(t, []string{"DATABASE_URL=" + dsn}, "init")
		if r.Code == 0 || strings.Contains(r.Stderr+r.Stdout, secret) {
			t.Fatalf("via DATABASE_URL: code %d, output %q", r.Code, r.Stderr)
		}
	}
}
