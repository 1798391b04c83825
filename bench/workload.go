package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// workloadScript is one OLTP transaction on orders: 1 INSERT, 2 UPDATEs by
// random existing id (in key order, so that clients cannot deadlock on each
// other), 3 SELECTs (2 by id, 1 by customer_id). It only uses what an
// application does through a plain table or an auto-updatable view.
const workloadScript = `\set id1 random(1, :maxid)
\set id2 random(1, :maxid)
\set lo least(:id1, :id2)
\set hi greatest(:id1, :id2)
\set cid random(1, :ncust)
\set amt random(1, 1000000)
BEGIN;
INSERT INTO orders (customer_id, customer_name, amount, status) VALUES (:cid, 'customer ' || :cid, :amt / 100.0, 'new');
UPDATE orders SET status = 'paid', amount = amount + 1 WHERE id = :lo;
UPDATE orders SET status = 'shipped' WHERE id = :hi;
SELECT id, customer_id, amount, status FROM orders WHERE id = :lo;
SELECT id, customer_id, amount, status FROM orders WHERE id = :hi;
SELECT count(*), sum(amount) FROM orders WHERE customer_id = :cid;
END;
`

// workload is one running pgbench. It runs until stopped (its -T is only a
// safety net); every transaction is logged with its end time, so windows are
// cut from the logs afterwards.
type workload struct {
	name    string
	cmd     *exec.Cmd
	prefix  string
	errPath string
	exited  chan struct{}
	waitErr error
}

// startWorkload starts pgbench and lets it ramp up for cfg.Warmup (a fixed
// measurement lead-in, not a synchronisation), then checks it is still alive.
func (b *bench) startWorkload(ctx context.Context, name string) (*workload, error) {
	return b.startWorkloadOn(ctx, name, b.cfg.Rows)
}

// startWorkloadOn is startWorkload on a table of rows rows (the ids its
// updates and selects pick from): the smaller table of an in-run scale
// comparison.
func (b *bench) startWorkloadOn(ctx context.Context, name string, rows int) (*workload, error) {
	script := filepath.Join(b.work, "orders.sql")
	if err := os.WriteFile(script, []byte(workloadScript), 0o644); err != nil {
		return nil, fmt.Errorf("write pgbench script: %w", err)
	}
	w := &workload{name: name, prefix: filepath.Join(b.work, "tx-"+name), errPath: filepath.Join(b.work, "pgbench-"+name+".log"),
		exited: make(chan struct{})}
	errFile, err := os.Create(w.errPath)
	if err != nil {
		return nil, fmt.Errorf("pgbench output file: %w", err)
	}
	args := []string{"-n", "-f", script,
		"-c", strconv.Itoa(b.cfg.Clients), "-j", strconv.Itoa(b.cfg.Threads),
		"-T", "7200", "-P", "1",
		"-l", "--log-prefix", w.prefix, "--failures-detailed",
		"-D", "maxid=" + strconv.Itoa(rows), "-D", "ncust=" + strconv.Itoa(b.cfg.Customers)}
	w.cmd = exec.Command(filepath.Join(b.srv.BinDir, "pgbench"), args...)
	w.cmd.Dir = b.work
	w.cmd.Env = append(os.Environ(), "PGHOST="+b.host, "PGPORT="+strconv.Itoa(int(b.port)),
		"PGUSER=postgres", "PGDATABASE="+benchDB, "PGSSLMODE=disable")
	w.cmd.Stdout, w.cmd.Stderr = errFile, errFile
	w.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := w.cmd.Start(); err != nil {
		errFile.Close()
		return nil, fmt.Errorf("start pgbench: %w", err)
	}
	go func() {
		w.waitErr = w.cmd.Wait()
		errFile.Close()
		close(w.exited)
	}()
	select {
	case <-time.After(b.cfg.Warmup):
	case <-w.exited:
		out, _ := os.ReadFile(w.errPath)
		return nil, fmt.Errorf("pgbench exited during warm-up: %v: %s", w.waitErr, tail(string(out), 800))
	case <-ctx.Done():
		w.kill()
		return nil, ctx.Err()
	}
	return w, nil
}

// errWorkloadExited means pgbench ended before it was stopped: every client
// aborted on an error. Under a tool being measured that is a finding (the
// errors are counted), not a harness failure.
var errWorkloadExited = errors.New("pgbench ended early: every client aborted on an error")

// hold keeps the workload running for d (a fixed measurement window), failing
// early if pgbench dies or the run is interrupted.
func (w *workload) hold(ctx context.Context, d time.Duration) error {
	select {
	case <-time.After(d):
		return nil
	case <-w.exited:
		return fmt.Errorf("%w (%v; its output is %s in the work folder, kept with BENCH_KEEP=1)", errWorkloadExited, w.waitErr, filepath.Base(w.errPath))
	case <-ctx.Done():
		return ctx.Err()
	}
}

// holdOrNote is hold for windows where the workload dying is a finding: it is
// noted and the run goes on (the windows after it then say why they are empty).
func (w *workload) holdOrNote(ctx context.Context, d time.Duration, r *results, what string) error {
	err := w.hold(ctx, d)
	if errors.Is(err, errWorkloadExited) {
		r.note("%s: %v", what, err)
		return nil
	}
	return err
}

func (w *workload) kill() {
	select {
	case <-w.exited:
	default:
		_ = w.cmd.Process.Kill()
		<-w.exited
	}
}

// stop ends pgbench (SIGINT: it stops at once; only the last few buffered log
// lines, which lie after every window, are lost) and reads its logs.
func (w *workload) stop() (*txlog, error) {
	select {
	case <-w.exited:
	default:
		_ = w.cmd.Process.Signal(syscall.SIGINT)
		select {
		case <-w.exited:
		case <-time.After(10 * time.Second):
			w.kill()
		}
	}
	return readTxLogs(w.prefix, w.errPath)
}

// tx is one pgbench transaction: end time and latency in microseconds.
type tx struct {
	end    int64
	lat    int64
	failed bool
}

// txlog is a workload's transactions plus the clients that aborted on an error
// (pgbench aborts a client on any error it does not retry).
type txlog struct {
	txs     []tx
	aborted int
	errors  []string
	// covered is the earliest of each log file's last transaction end: past
	// it, transactions may be missing (pgbench's buffered log lost at stop).
	covered int64
}

func readTxLogs(prefix, errPath string) (*txlog, error) {
	files, err := filepath.Glob(prefix + ".*")
	if err != nil {
		return nil, fmt.Errorf("pgbench logs: %w", err)
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("pgbench wrote no transaction log at %s.*", prefix)
	}
	l := &txlog{covered: math.MaxInt64}
	for _, f := range files {
		if err := l.readFile(f); err != nil {
			return nil, err
		}
	}
	sort.Slice(l.txs, func(i, j int) bool { return l.txs[i].end < l.txs[j].end })
	if out, err := os.ReadFile(errPath); err == nil {
		seen := map[string]int{}
		for _, line := range strings.Split(string(out), "\n") {
			if strings.Contains(line, "aborted in command") {
				l.aborted++
				// "pgbench: error: client 3 script 0 aborted in command 7 query 0: ERROR: ..."
				msg := line
				if _, after, ok := strings.Cut(line, " query "); ok {
					if _, m, ok := strings.Cut(after, ": "); ok {
						msg = m
					}
				}
				seen[strings.TrimSpace(msg)]++
			}
		}
		for _, msg := range sortedKeys(seenKeys(seen)) {
			l.errors = append(l.errors, fmt.Sprintf("%d× %s", seen[msg], msg))
		}
	}
	return l, nil
}

func seenKeys(m map[string]int) map[string]string {
	out := make(map[string]string, len(m))
	for k := range m {
		out[k] = k
	}
	return out
}

// readFile parses "client_id transaction_no time script_no time_epoch time_us
// [schedule_lag] [retries]", where time is microseconds or a failure word. A
// torn last line (pgbench stopped mid-write) is skipped.
func (l *txlog) readFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open pgbench log: %w", err)
	}
	defer f.Close()
	var last int64
	defer func() { l.covered = min(l.covered, last) }()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 6 {
			continue
		}
		sec, err1 := strconv.ParseInt(fs[4], 10, 64)
		us, err2 := strconv.ParseInt(fs[5], 10, 64)
		if err1 != nil || err2 != nil || us >= 1_000_000 {
			continue
		}
		t := tx{end: sec*1_000_000 + us}
		last = max(last, t.end)
		switch fs[2] {
		case "skipped":
			continue
		case "failed", "serialization", "deadlock", "other":
			t.failed = true
		default:
			lat, err := strconv.ParseInt(fs[2], 10, 64)
			if err != nil {
				continue
			}
			t.lat = lat
		}
		l.txs = append(l.txs, t)
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read pgbench log %s: %w", path, err)
	}
	return nil
}

// stats are a window's workload figures.
type stats struct {
	Seconds float64
	N       int
	Failed  int
	TPS     float64
	P50ms   float64
	P99ms   float64
	MaxMs   float64 // longest transaction that overlapped the window
}

// maxLatency is the workload's max latency over a window, or why the log
// cannot give it.
func (l *txlog) maxLatency(from, to time.Time) M {
	s, err := l.window(from, to)
	if err != nil {
		return none(err.Error())
	}
	return some(s.MaxMs)
}

// window cuts [from, to): throughput and percentiles over the transactions that
// ended in it; the maximum over every transaction that overlapped it, so a
// transaction stalled by a lock taken inside the window counts even when it
// ended after it.
func (l *txlog) window(from, to time.Time) (stats, error) {
	f, t := from.UnixMicro(), to.UnixMicro()
	s := stats{Seconds: to.Sub(from).Seconds()}
	if t <= f {
		return s, errors.New("empty window")
	}
	if t > l.covered {
		if l.aborted > 0 {
			return s, fmt.Errorf("the workload had stopped: %d pgbench clients aborted on errors", l.aborted)
		}
		return s, fmt.Errorf("the pgbench log ends %.2fs before the window does", float64(t-l.covered)/1e6)
	}
	var lats []int64
	var maxLat int64
	for _, x := range l.txs {
		if x.end >= f && x.end < t {
			if x.failed {
				s.Failed++
			} else {
				lats = append(lats, x.lat)
			}
		}
		if !x.failed && x.end > f && x.end-x.lat < t && x.lat > maxLat {
			maxLat = x.lat
		}
	}
	if len(lats) == 0 {
		return s, fmt.Errorf("no transaction completed in the %.1fs window", s.Seconds)
	}
	sort.Slice(lats, func(i, j int) bool { return lats[i] < lats[j] })
	s.N = len(lats)
	s.TPS = float64(len(lats)) / s.Seconds
	s.P50ms = float64(pct(lats, 0.50)) / 1000
	s.P99ms = float64(pct(lats, 0.99)) / 1000
	s.MaxMs = float64(maxLat) / 1000
	return s, nil
}

// errorsBetween counts failed transactions in [from, to) plus aborted clients
// (an abort ends the client, so it counts for the whole run).
func (l *txlog) errorsBetween(from, to time.Time) int {
	n := l.aborted
	f, t := from.UnixMicro(), to.UnixMicro()
	for _, x := range l.txs {
		if x.failed && x.end >= f && x.end < t {
			n++
		}
	}
	return n
}

func pct(sorted []int64, q float64) int64 {
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func tail(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) > n {
		s = "…" + s[len(s)-n:]
	}
	return s
}

// stepRatios cuts [from, to) at each log line a shadowctl command wrote while
// it ran (green built, bulk copy done, each index built, vacuumed,
// verified) and gives the workload's throughput in each step as a share of
// ref: which step costs the application what. A step shorter than a second
// joins the next one (the last joins the one before): a fraction of a
// second holds too few transactions to say anything.
func stepRatios(l *txlog, events []stampedLine, from, to time.Time, ref M) string {
	type step struct {
		start, end time.Time
		labels     []string
	}
	var steps []step
	open := step{start: from}
	for _, e := range events {
		var line struct {
			Message string `json:"message"`
		}
		if json.Unmarshal([]byte(e.text), &line) != nil || line.Message == "" || e.at.Before(from) || !e.at.Before(to) {
			continue
		}
		open.labels = append(open.labels, strconv.Quote(line.Message))
		if e.at.Sub(open.start) >= time.Second {
			open.end = e.at
			steps = append(steps, open)
			open = step{start: e.at}
		}
	}
	open.end, open.labels = to, append(open.labels, "ready")
	if n := len(steps); n > 0 && to.Sub(open.start) < time.Second {
		steps[n-1].end, steps[n-1].labels = to, append(steps[n-1].labels, open.labels...)
	} else {
		steps = append(steps, open)
	}
	parts := make([]string, 0, len(steps))
	for _, st := range steps {
		what := fmt.Sprintf("%.1f s to %s", st.end.Sub(st.start).Seconds(), strings.Join(st.labels, ", "))
		if s, err := l.window(st.start, st.end); err != nil {
			what += ": " + err.Error()
		} else if ref.known() {
			what += fmt.Sprintf(": %.0f TPS, %.2f", s.TPS, s.TPS/ref.val())
		}
		parts = append(parts, what)
	}
	return strings.Join(parts, "; ")
}
