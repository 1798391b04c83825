package main

import (
	"encoding/json"
	"fmt"
	"maps"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"testing"
	"time"
)

// The JSON carries exactly issue 8's keys (plus machine, settings, the CPU
// of each window, the bare consumer's and the plain trigger's ratios), with null for what was not
// measured.
func TestJSONKeysExactly(t *testing.T) {
	b := &bench{cfg: config{Rows: 1000, Clients: 4, Threads: 2, Load: 20 * time.Second}, settings: map[string]string{"fsync": "on"}}
	r := newResults(1000)
	r.BaselineTPS = some(700)
	r.Trigger.allNone("not built")
	r.Logical.allNone("not built")
	data, err := json.Marshal(b.jsonOf(r))
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatal(err)
	}
	keys := func(m map[string]any) string {
		var ks []string
		for k := range m {
			ks = append(ks, k)
		}
		sort.Strings(ks)
		return strings.Join(ks, ",")
	}
	if k := keys(got); k != "baseline_tps,cpu_windows,logical,machine,offline_alter_max_latency_ms,raw_copy_s,rows,settings,trigger" {
		t.Errorf("top-level keys: %s", k)
	}
	if k := keys(got["trigger"].(map[string]any)); k != "alone_after_tps_ratio,copy_idle_s,copy_load_s,cutover_max_latency_ms,lock_hold_ms,p99_ms,peak_rss_mb,plain_trigger_tps_ratio,sync_tps_ratio,tps_ratio,verify_rows_per_s" {
		t.Errorf("trigger keys: %s", k)
	}
	if k := keys(got["logical"].(map[string]any)); k != "alone_after_tps_ratio,bare_consumer_tps_ratio,copy_idle_s,copy_load_s,cutover_max_latency_ms,lag_p99_s,lock_hold_ms,p99_ms,peak_rss_mb,sync_tps_ratio,tps_ratio" {
		t.Errorf("logical keys: %s", k)
	}
	if got["baseline_tps"] != 700.0 || got["raw_copy_s"] != nil || got["trigger"].(map[string]any)["copy_idle_s"] != nil {
		t.Errorf("values: baseline %v, raw %v, trigger.copy_idle_s %v", got["baseline_tps"], got["raw_copy_s"], got["trigger"].(map[string]any)["copy_idle_s"])
	}
}

func at(sec float64) int64 { return int64(sec * 1e6) }

// Throughput and percentiles count what ended in the window; the maximum
// counts whatever overlapped it, so a stalled transaction ending later shows.
func TestWindow(t *testing.T) {
	l := &txlog{covered: at(100)}
	for i := 0; i < 100; i++ { // 10 ms transactions ending every 100 ms from 10 s
		l.txs = append(l.txs, tx{end: at(10 + float64(i)*0.1), lat: 10_000})
	}
	l.txs = append(l.txs, tx{end: at(22), lat: 3_000_000}) // began at 19 s, inside [15, 20)
	l.txs = append(l.txs, tx{end: at(16), failed: true})
	sort.Slice(l.txs, func(i, j int) bool { return l.txs[i].end < l.txs[j].end })
	s, err := l.window(time.UnixMicro(at(15)), time.UnixMicro(at(20)))
	if err != nil {
		t.Fatal(err)
	}
	if s.N != 50 || s.TPS != 10 || s.Failed != 1 {
		t.Errorf("N %d TPS %v failed %d, want 50, 10, 1", s.N, s.TPS, s.Failed)
	}
	if s.P99ms != 10 || s.MaxMs != 3000 {
		t.Errorf("p99 %v max %v, want 10 and 3000", s.P99ms, s.MaxMs)
	}
	if n := l.errorsBetween(time.UnixMicro(at(0)), time.UnixMicro(at(100))); n != 1 {
		t.Errorf("errors %d, want 1", n)
	}
	if _, err := l.window(time.UnixMicro(at(90)), time.UnixMicro(at(101))); err == nil {
		t.Error("a window past the log's coverage must be an error")
	}
	if _, err := l.window(time.UnixMicro(at(50)), time.UnixMicro(at(60))); err == nil {
		t.Error("a window without transactions must be an error")
	}
}

// Per-transaction logs from two threads, a torn last line, failures, and
// clients aborted on errors.
func TestReadTxLogs(t *testing.T) {
	dir := t.TempDir()
	prefix := filepath.Join(dir, "tx-x")
	write := func(name, s string) {
		if err := os.WriteFile(name, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(prefix+".42", "0 0 3098 0 1795846358 190853\n0 1 failed 0 1795846358 290853\n1 0 2500 0 1795846359 1000\n1 1 25")
	write(prefix+".42.1", "2 0 1500 0 1795846358 500000 0\n3 0 deadlock 0 1795846358 600000 0\n")
	write(filepath.Join(dir, "err.log"), "progress: 1.0 s, 10 tps\n"+
		"pgbench: error: client 3 script 0 aborted in command 7 query 0: ERROR:  relation \"orders\" does not exist\n"+
		"pgbench: error: client 1 script 0 aborted in command 7 query 0: ERROR:  relation \"orders\" does not exist\n")
	l, err := readTxLogs(prefix, filepath.Join(dir, "err.log"))
	if err != nil {
		t.Fatal(err)
	}
	if len(l.txs) != 5 {
		t.Fatalf("%d transactions, want 5", len(l.txs))
	}
	failed := 0
	for _, x := range l.txs {
		if x.failed {
			failed++
		}
	}
	if failed != 2 || l.aborted != 2 {
		t.Errorf("failed %d aborted %d, want 2 and 2", failed, l.aborted)
	}
	if len(l.errors) != 1 || !strings.HasPrefix(l.errors[0], "2× ERROR:  relation") {
		t.Errorf("errors %q", l.errors)
	}
	if want := at(1795846358) + 600000; l.covered != want {
		t.Errorf("covered %d, want %d (the earlier of the files' last transactions)", l.covered, want)
	}
}

// status JSON is read loosely: nesting, numbers as strings, missing keys, and
// log lines around the object.
func TestStatusDecoding(t *testing.T) {
	m := decodeObject("{\"level\":\"info\"}\n" + `{"id":"x","phase":"ready","last_cutover":{"lock_wait_ms":"3.5","lock_hold_ms":12},"verify":null}`)
	if m == nil || str(m, "phase") != "ready" {
		t.Fatalf("decoded %v", m)
	}
	if v, ok := num(m, "last_cutover", "lock_wait_ms"); !ok || v != 3.5 {
		t.Errorf("lock_wait_ms %v %v", v, ok)
	}
	if v, ok := num(m, "last_cutover", "lock_hold_ms"); !ok || v != 12 {
		t.Errorf("lock_hold_ms %v %v", v, ok)
	}
	if _, ok := num(m, "verify", "rows"); ok {
		t.Error("verify is null: no rows")
	}
	if _, ok := num(nil, "x"); ok {
		t.Error("nil map")
	}
	if decodeObject("not json") != nil {
		t.Error("no object")
	}
}

func TestCLIReasons(t *testing.T) {
	r := cliResult{args: []string{"start"}, exit: 3, stderr: "shadowctl: No help topic for 'start'\n"}
	if !r.notImplemented() || r.reason() != "shadowctl start is not implemented in this build (No help topic for 'start')" {
		t.Errorf("reason %q", r.reason())
	}
	r = cliResult{args: []string{"cutover"}, exit: 1, stderr: "{\"level\":\"warn\"}\nshadowctl: lock timeout after 5 attempts\n"}
	if r.notImplemented() || r.reason() != "shadowctl cutover failed (exit 1): lock timeout after 5 attempts" {
		t.Errorf("reason %q", r.reason())
	}
	r.timedOut = time.Minute
	if !strings.Contains(r.reason(), "did not finish within 1m0s") {
		t.Errorf("reason %q", r.reason())
	}
}

// The cutover figures are the medians of the samples, each with the
// maximum latency of its own workload; one unreadable sample leaves the
// first swap's figures, and says so.
func TestSwapMedians(t *testing.T) {
	b := &bench{}
	sample := func(lat, hold, wait float64) swapSample {
		return swapSample{maxLat: some(lat), hold: hold, wait: wait, holdKnown: true}
	}
	m := &modeResult{CutoverMaxLatencyMs: some(99), LockHoldMs: some(99), LockWaitMs: some(99)}
	r := newResults(1000)
	b.swapMedians(m, []swapSample{sample(40, 30, 2), sample(60, 10, 5), sample(50, 20, 1)}, "logical", "the load run's, then one after each idle run", r)
	if m.CutoverMaxLatencyMs.val() != 50 || m.LockHoldMs.val() != 20 || m.LockWaitMs.val() != 2 {
		t.Errorf("medians: latency %v, hold %v, wait %v; want 50, 20, 2", m.CutoverMaxLatencyMs.val(), m.LockHoldMs.val(), m.LockWaitMs.val())
	}
	if len(r.Notes) != 1 || !strings.Contains(r.Notes[0], "3 cutovers, the load run's, then one after each idle run") {
		t.Errorf("notes: %q", r.Notes)
	}

	m = &modeResult{CutoverMaxLatencyMs: some(99), LockHoldMs: some(98), LockWaitMs: some(97)}
	r = newResults(1000)
	b.swapMedians(m, []swapSample{sample(40, 30, 2), {maxLat: none("log not covered"), holdKnown: true}}, "logical", "", r)
	if m.CutoverMaxLatencyMs.val() != 99 || m.LockHoldMs.val() != 98 || m.LockWaitMs.val() != 97 {
		t.Errorf("with an unreadable sample the first swap's figures stay; got %v, %v, %v", m.CutoverMaxLatencyMs.val(), m.LockHoldMs.val(), m.LockWaitMs.val())
	}
	if len(r.Notes) != 1 || !strings.Contains(r.Notes[0], "one swap only") {
		t.Errorf("notes: %q", r.Notes)
	}
}

// The median of an even number of runs is the mean of the middle two: the
// scale runs measure two, and the upper one made each figure their maximum.
func TestMedianOfEvenCountIsTheMiddleMean(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{
		{[]float64{50.13, 45.75}, 47.94},
		{[]float64{3, 1, 2}, 2},
		{[]float64{4, 1, 3, 2}, 2.5},
		{[]float64{7}, 7},
	} {
		if got := median(c.in); math.Abs(got-c.want) > 1e-9 {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}

// A figure that a partial run (BENCH_ONLY) left out says so, in the table and
// in the targets, instead of an empty reason.
func TestSkippedFigureSaysWhy(t *testing.T) {
	var skipped M
	if got := fmtM(skipped, "s"); got != "not measured: not run (BENCH_ONLY)" {
		t.Errorf("skipped figure: %q", got)
	}
	if got := fmtM(none("a | b"), "s"); got != `not measured: a \| b` {
		t.Errorf("figure with a reason: %q", got)
	}
	b := &bench{cfg: config{Rows: 1000}}
	for _, tg := range b.targets(newResults(1000)) {
		if strings.HasSuffix(tg.result, ": ") {
			t.Errorf("target %q: empty reason %q", tg.name, tg.result)
		}
	}
}

// With BENCH_SCALE_FROM the scale targets come from this run's alternated
// idle runs (time to ready 4.5 times for 4 times the rows) and the cutovers
// after them (no larger at the full size, within the noise allowance), and
// the JSON carries them under scale_in_run; without it neither appears.
func TestScaleInRunTarget(t *testing.T) {
	b := &bench{cfg: config{Rows: 8_000_000, ScaleFrom: 2_000_000, OutDir: t.TempDir()}}
	r := newResults(8_000_000)
	r.Trigger.ScaleIdleRatio, r.Logical.ScaleIdleRatio = some(4.2), some(4.6)
	swaps := func(latMs []float64, holdMs ...float64) scaleSwaps {
		var cuts []swapSample
		for i := range latMs {
			cuts = append(cuts, swapSample{maxLat: some(latMs[i]), hold: holdMs[i], holdKnown: true})
		}
		return scaleSwapsOf(cuts, 3)
	}
	// Trigger: latency 20 at 8M against 13 at 2M passes with the 10 ms
	// allowance, hold 4 against 3 too. Logical: hold 17 against 10 fails
	// (12 after the 5 ms allowance), latency 25 against 40 passes.
	r.Trigger.ScaleSwaps = [2]scaleSwaps{swaps([]float64{12, 13, 30}, 3, 2, 9), swaps([]float64{20, 19, 50}, 4, 5, 1)}
	r.Logical.ScaleSwaps = [2]scaleSwaps{swaps([]float64{40, 41, 39}, 10, 9, 11), swaps([]float64{25, 26, 24}, 17, 18, 16)}
	got := map[string]string{}
	for _, tg := range b.targets(r) {
		if strings.Contains(tg.name, "alternated in this run") {
			f := strings.Fields(tg.name)
			got[f[0]+" "+f[1]] = tg.measured + " " + tg.result
		}
	}
	want := map[string]string{
		"trigger time": "4.20 pass", "logical time": "4.60 **fail**",
		"trigger cutover": "0.77 pass", "trigger lock": "0.00 pass",
		"logical cutover": "0.38 pass", "logical lock": "1.20 **fail**",
	}
	if !maps.Equal(got, want) {
		t.Errorf("in-run scale targets: %v, want %v", got, want)
	}
	// The comparison with a separate run at 2M gives way to this run's own.
	for _, tg := range b.targets(r) {
		if strings.Contains(tg.name, "8M") {
			t.Errorf("a cross-run scale target in a run that compares the sizes itself: %s", tg.name)
		}
	}
	// A size with a swap missing is not measured, not passed.
	r.Logical.ScaleSwaps[1] = scaleSwapsOf(nil, 3)
	for _, tg := range b.targets(r) {
		if strings.HasPrefix(tg.name, "logical lock hold") && !strings.Contains(tg.result, "0 of 3 cutovers readable") {
			t.Errorf("logical hold with no 8M cutovers: %+v", tg)
		}
	}
	r.Logical.ScaleSwaps[1] = swaps([]float64{25, 26, 24}, 17, 18, 16)
	data, err := json.Marshal(b.jsonOf(r))
	if err != nil {
		t.Fatal(err)
	}
	for _, part := range []string{
		`"scale_in_run":{"from_rows":2000000,"trigger_copy_idle_ratio":4.2,"logical_copy_idle_ratio":4.6,`,
		`"trigger_cutovers":{"at_from_rows":{"cutover_max_latency_ms":13,"lock_hold_ms":3},"at_rows":{"cutover_max_latency_ms":20,"lock_hold_ms":4}}`,
		`"logical_cutovers":{"at_from_rows":{"cutover_max_latency_ms":40,"lock_hold_ms":10},"at_rows":{"cutover_max_latency_ms":25,"lock_hold_ms":17}}`,
	} {
		if !strings.Contains(string(data), part) {
			t.Errorf("JSON without %s: %s", part, data)
		}
	}
	b.cfg.ScaleFrom = 0
	for _, tg := range b.targets(r) {
		if strings.Contains(tg.name, "alternated in this run") {
			t.Errorf("in-run scale target without BENCH_SCALE_FROM: %s", tg.name)
		}
	}
	if data, _ := json.Marshal(b.jsonOf(r)); strings.Contains(string(data), "scale_in_run") {
		t.Errorf("scale_in_run without BENCH_SCALE_FROM: %s", data)
	}
}

// The raw limit's figure is the median of every run, those the modes' idle
// runs make right before theirs included, and its split is that run's.
func TestRawFigureIsTheMedianOfEveryRun(t *testing.T) {
	r := newResults(1000)
	for i, secs := range []float64{5.2, 6.9, 4.0, 5.5, 5.0} {
		r.rawRuns = append(r.rawRuns, rawRun{when: fmt.Sprint("run ", i), rows: 1000,
			insert: time.Duration(secs * 0.75 * float64(time.Second)), index: time.Duration(secs * 0.25 * float64(time.Second))})
		r.setRaw()
	}
	if got := fmtM(r.RawCopyS, ""); got != "5.20" {
		t.Errorf("raw_copy_s of 5.2, 6.9, 4.0, 5.5, 5.0: %s, want 5.20", got)
	}
	if got := fmtM(r.RawInsertS, ""); got != "3.90" {
		t.Errorf("raw insert of the median run: %s, want 3.90", got)
	}
	r.rawNotes()
	if n := r.Notes[0]; !strings.Contains(n, "4.00, 5.00, 5.20, 5.50, 6.90 s, 5 runs") {
		t.Errorf("raw note: %s", n)
	}
}

// The probe times real work on its thread's CPU clock, and a window's
// figure is the median of the samples taken inside it.
func TestProbeWindowIsTheMedianInside(t *testing.T) {
	if ms := probeOnce(make([]byte, 64<<10)); ms <= 0 || ms > 1000 {
		t.Fatalf("probe: %v ms of CPU for 40 SHA-256 sums of 64 KiB", ms)
	}
	t0 := time.Now()
	c := &cpuClock{}
	for i, ms := range []float64{9, 1.4, 1.2, 1.3, 9} {
		c.probes = append(c.probes, probeSample{t0.Add(time.Duration(i) * time.Second), ms})
	}
	if got := c.probeMedian(t0.Add(time.Second), t0.Add(3*time.Second)); got != 1.3 {
		t.Errorf("median of the samples at 1-3 s: %v, want 1.3", got)
	}
	if got := c.probeMedian(t0.Add(10*time.Second), t0.Add(11*time.Second)); got != 0 {
		t.Errorf("a window without samples: %v, want 0", got)
	}
}

// The workload's log is cut at each JSON line the command wrote, by when it
// arrived; a step under a second joins the next one (the last, the one
// before), and lines that are not log events (or fall outside the window)
// cut nothing.
func TestStepRatiosCutAtEachLogLine(t *testing.T) {
	l := &txlog{covered: at(100)}
	for i := range 200 { // 100 TPS from 10 s to 12 s, then 50 TPS to 16 s
		l.txs = append(l.txs, tx{end: at(10 + float64(i)*0.01), lat: 1000})
	}
	for i := range 200 {
		l.txs = append(l.txs, tx{end: at(12 + float64(i)*0.02), lat: 1000})
	}
	var s lineStamper
	ev := func(sec float64, text string) stampedLine {
		return stampedLine{at: time.UnixMicro(at(sec)), text: text}
	}
	fmt.Fprint(&s, `{"message":"green built"}`+"\n"+`{"mess`) // a line arrives in two writes
	fmt.Fprint(&s, `age":"bulk copy done"}`+"\nnot json\n")
	if got := s.stamped(); len(got) != 3 || got[1].text != `{"message":"bulk copy done"}` {
		t.Fatalf("stamped lines %v", got)
	}
	events := []stampedLine{
		ev(5, `{"message":"submitted"}`), // before the window
		ev(10.5, `{"message":"green built"}`),
		ev(12, `{"message":"bulk copy done"}`),
		ev(12, `{"message":"index built"}`), // in the same write as the line before
		ev(13, "not json"),
		ev(14, `{"message":"verified"}`),
		ev(15.5, `{"message":"ready soon"}`), // the last half second joins the step before
	}
	got := stepRatios(l, events, time.UnixMicro(at(10)), time.UnixMicro(at(16)), some(100))
	want := `2.0 s to "green built", "bulk copy done": 100 TPS, 1.00; 2.0 s to "index built", "verified": 50 TPS, 0.50; 2.0 s to "ready soon", ready: 50 TPS, 0.50`
	if got != want {
		t.Errorf("steps\n got %s\nwant %s", got, want)
	}
}

// A child's peak RSS is its own: a small child of a large parent reads small,
// and a child that holds 40 MB reads at least that. (The child's rusage
// read the parent's size for every child.)
func TestPeakRSSIsTheChildsOwn(t *testing.T) {
	ballast := make([]byte, 200<<20)
	for i := range ballast {
		ballast[i] = 1
	}
	if kb := readHWM("/proc/self/status"); kb < 200<<10 {
		t.Fatalf("the test's own high-water mark is %d KiB, want at least 200 MiB", kb)
	}
	small, err := runMeasured(exec.Command("true"))
	if err != nil {
		t.Fatal(err)
	}
	big, err := runMeasured(exec.Command("sh", "-c", `x=$(head -c 40000000 /dev/zero | tr '\0' a); test ${#x} -eq 40000000`))
	if err != nil {
		t.Fatal(err)
	}
	runtime.KeepAlive(ballast)
	if small > 100<<10 {
		t.Errorf("`true` peaked at %d KiB: the parent's size, not its own", small)
	}
	if big < 40000000/1024 || big > 150<<10 {
		t.Errorf("a shell holding a 40 MB string peaked at %d KiB, want 39,063 to 153,600", big)
	}
}

// The window alone after finalize reads against the reference, and each
// window of the run against the mean of the two; windows that did not run
// (zero times) are left out.
func TestAfterDriftBracketsTheRunsWindows(t *testing.T) {
	l := &txlog{covered: at(100)}
	add := func(from, to float64, tps int) {
		n := int((to - from) * float64(tps))
		for i := range n {
			l.txs = append(l.txs, tx{end: at(from + float64(i)/float64(tps)), lat: 1000})
		}
	}
	add(10, 20, 80) // the copy
	add(20, 30, 60) // sync only
	add(50, 60, 60) // alone after finalize
	sec := func(s float64) time.Time { return time.UnixMicro(at(s)) }
	var r results
	b := &bench{}
	got := b.afterDrift(l, &r, "trigger", some(100), sec(50), sec(60), []driftWindow{
		{"during the copy", sec(10), sec(20)}, {"sync only", sec(20), sec(30)}, {"the plain trigger", time.Time{}, time.Time{}}})
	if !got.known() || got.val() != 0.6 {
		t.Fatalf("alone after: %v, want 0.6 of the reference", got)
	}
	if len(r.Notes) != 1 || !strings.Contains(r.Notes[0], "(80 TPS): during the copy 1.00, sync only 0.75") || strings.Contains(r.Notes[0], "plain") {
		t.Errorf("notes %q", r.Notes)
	}
	if got := b.afterDrift(l, &r, "trigger", some(100), sec(60), sec(60), nil); got.known() {
		t.Errorf("an empty window alone read %v", got)
	}
}
