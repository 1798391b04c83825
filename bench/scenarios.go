package main

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// runAll measures every scenario in one run. Harness failures (the database,
// pgbench) end the run with an error; failures of the tools under test become
// "not measured" figures with their reason.
func (b *bench) runAll(ctx context.Context) (*results, error) {
	r := newResults(b.cfg.Rows)
	defer func() { r.Duration = time.Since(r.Started) }()
	if la, n := b.machine.LoadAvg, float64(b.machine.Cores); la > n/2 {
		r.note("the machine was busy when the run began (load average %.2f on %d cores): absolute figures are depressed; the ratios divide by a reference window from the same pgbench run", la, b.machine.Cores)
	}
	steps := []struct {
		name string
		key  string
		fn   func(context.Context, *results) error
	}{
		{"raw limit", "raw", b.rawCopy},
		{"baseline", "baseline", b.baseline},
		{"shadowctl trigger", "trigger", func(ctx context.Context, r *results) error { return b.shadowctlMode(ctx, r, "trigger", &r.Trigger) }},
		{"shadowctl logical", "logical", func(ctx context.Context, r *results) error { return b.shadowctlMode(ctx, r, "logical", &r.Logical) }},
		{"scale at idle", "scale", b.scaleIdle},
		{"pg_repack", "repack", b.repack},
		{"offline ALTER", "alter", b.offlineAlter},
	}
	var loads []string
	defer func() {
		r.rawNotes()
		r.note("load average (1 min) at the start of each scenario: %s", strings.Join(loads, ", "))
	}()
	for _, s := range steps {
		if s.key == "scale" {
			if b.cfg.ScaleFrom == 0 {
				continue
			}
		} else if b.cfg.Only != nil && !b.cfg.Only[s.key] {
			continue
		}
		loads = append(loads, fmt.Sprintf("%s %.1f", s.name, loadAvg()))
		logf("— %s", s.name)
		if err := s.fn(ctx, r); err != nil {
			return nil, fmt.Errorf("%s: %w", s.name, err)
		}
	}
	r.Duration = time.Since(r.Started)
	return r, nil
}

// underLoad starts the workload called name and lets it run through its
// reference window (the ratios' denominator); it returns the workload and
// when that window began.
func (b *bench) underLoad(ctx context.Context, name string) (*workload, time.Time, error) {
	w, err := b.startWorkload(ctx, name)
	if err != nil {
		return nil, time.Time{}, err
	}
	tPre := time.Now()
	if err := w.hold(ctx, b.cfg.SyncWin); err != nil {
		w.kill()
		return nil, time.Time{}, err
	}
	return w, tPre, nil
}

// loadAvg is the machine's 1-minute load average (0 when unknown).
func loadAvg() float64 {
	var la float64
	if data, err := os.ReadFile("/proc/loadavg"); err == nil {
		_, _ = fmt.Sscanf(string(data), "%g", &la)
	}
	return la
}

// dirty is set when a scenario may have changed orders; clean resets it.
func (b *bench) clean(ctx context.Context) error {
	if !b.dirty {
		return nil
	}
	if err := b.fresh(ctx); err != nil {
		return err
	}
	b.dirty = false
	return b.checkpoint(ctx)
}

// rawCopy measures the raw limit: INSERT … SELECT of the mapping into a
// table with only its key, then the two secondary index builds, on an idle
// database, IdleReps times (rawOnce). Each mode's idle runs measure it once
// more right before each of theirs (shadowctlMode), so the raw limit's
// median spans the same minutes as the times to ready it is divided by: on
// this shared host the speed moves by a third within an hour.
func (b *bench) rawCopy(ctx context.Context, r *results) error {
	for range b.cfg.IdleReps {
		if err := b.rawOnce(ctx, r, "raw limit"); err != nil {
			return err
		}
	}
	c, err := b.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("acquire: %w", err)
	}
	defer c.Release()
	// The same copy into a table that already has its secondary indexes: the
	// effect of the "indexes after the bulk copy" lever at PostgreSQL's level.
	for _, st := range []string{
		scratchTableSQL,
		scratchIndexSQL[0], scratchIndexSQL[1],
		`CHECKPOINT`,
	} {
		if _, err := c.Exec(ctx, st); err != nil {
			return fmt.Errorf("indexed scratch: %w", err)
		}
	}
	t3 := time.Now()
	if _, err := c.Exec(ctx, rawCopySQL); err != nil {
		return fmt.Errorf("copy into indexed scratch: %w", err)
	}
	r.RawIndexedS = some(time.Since(t3).Seconds())
	if _, err := c.Exec(ctx, `DROP TABLE public.scratch`); err != nil {
		return fmt.Errorf("drop scratch: %w", err)
	}
	return b.checkpoint(ctx)
}

// The raw limit's statements: a table of the target types with only its
// key, the same mapping as the change in one INSERT … SELECT, then the two
// secondary indexes.
const (
	scratchTableSQL = `CREATE TABLE public.scratch (
		id bigint PRIMARY KEY, customer_id int, customer_name text,
		amount numeric(12,2), status text, created_at timestamptz DEFAULT now())`
	rawCopySQL = `INSERT INTO public.scratch (id, customer_id, customer_name, amount, status, created_at)
		SELECT id::bigint, customer_id, customer_name, amount::numeric(12,2), status, created_at FROM public.orders`
)

var scratchIndexSQL = []string{
	`CREATE INDEX scratch_customer_id_idx ON public.scratch (customer_id)`,
	`CREATE INDEX scratch_created_at_idx ON public.scratch (created_at)`,
}

// rawRun is one measurement of the raw limit; when says before what.
type rawRun struct {
	when          string
	rows          int64
	insert, index time.Duration
	machine       string
}

func (run rawRun) total() time.Duration { return run.insert + run.index }

// rawOnce measures the raw limit once on the bench database's orders (a
// fresh clone: it leaves orders as it found it), adds the run to the
// results and makes the median of all runs so far the figure.
func (b *bench) rawOnce(ctx context.Context, r *results, when string) error {
	c, err := b.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("acquire: %w", err)
	}
	defer c.Release()
	if err := b.checkpoint(ctx); err != nil {
		return err
	}
	if _, err := c.Exec(ctx, scratchTableSQL); err != nil {
		return fmt.Errorf("create scratch: %w", err)
	}
	t0 := time.Now()
	tag, err := c.Exec(ctx, rawCopySQL)
	if err != nil {
		return fmt.Errorf("copy into scratch: %w", err)
	}
	t1 := time.Now()
	for _, s := range scratchIndexSQL {
		if _, err := c.Exec(ctx, s); err != nil {
			return fmt.Errorf("index scratch: %w", err)
		}
	}
	t2 := time.Now()
	if _, err := c.Exec(ctx, `DROP TABLE public.scratch`); err != nil {
		return fmt.Errorf("drop scratch: %w", err)
	}
	run := rawRun{when: when, rows: tag.RowsAffected(), insert: t1.Sub(t0), index: t2.Sub(t1),
		machine: b.cpuWindow(r, "raw_limit_"+strconv.Itoa(len(r.rawRuns)+1), t0, t2)}
	r.rawRuns = append(r.rawRuns, run)
	logf("raw copy (%s): %d rows in %.2fs (insert %.2fs, indexes %.2fs)", when, run.rows, run.total().Seconds(), run.insert.Seconds(), run.index.Seconds())
	r.setRaw()
	return b.checkpoint(ctx)
}

// setRaw makes the median of the raw limit's runs the figure (of an even
// number, the mean of the middle two, as median does).
func (r *results) setRaw() {
	runs := slices.Clone(r.rawRuns)
	slices.SortFunc(runs, func(a, b rawRun) int { return cmp.Compare(a.total(), b.total()) })
	med := runs[len(runs)/2]
	if len(runs)%2 == 0 {
		lo := runs[len(runs)/2-1]
		med = rawRun{rows: med.rows, insert: (lo.insert + med.insert) / 2, index: (lo.index + med.index) / 2}
	}
	n := float64(med.rows)
	total := med.total().Seconds()
	r.RawRows = some(n)
	r.RawInsertS = some(med.insert.Seconds())
	r.RawIndexS = some(med.index.Seconds())
	r.RawCopyS = some(total)
	r.RawRowsPerS = some(n / total)
}

// rawNotes lists every raw limit run, in order, for the notes.
func (r *results) rawNotes() {
	if len(r.rawRuns) == 0 {
		return
	}
	all := make([]float64, len(r.rawRuns))
	machine := make([]string, len(r.rawRuns))
	for i, run := range r.rawRuns {
		all[i] = run.total().Seconds()
		machine[i] = fmt.Sprintf("%s, %.2f s: %s", run.when, all[i], run.machine)
	}
	r.note("raw limit, idle: %s s, %d runs (the median is the figure)", sortedFigures(all), len(all))
	r.note("raw limit, each run in order and the machine during it: %s", strings.Join(machine, "; "))
}

// sortedFigures renders measurements (seconds, milliseconds) smallest
// first, two decimals: "9.02, 9.47, 10.33".
func sortedFigures(v []float64) string {
	s := slices.Clone(v)
	slices.Sort(s)
	parts := make([]string, len(s))
	for i, x := range s {
		parts[i] = strconv.FormatFloat(x, 'f', 2, 64)
	}
	return strings.Join(parts, ", ")
}

// baseline is the workload alone for one load window.
func (b *bench) baseline(ctx context.Context, r *results) error {
	if err := b.clean(ctx); err != nil {
		return err
	}
	b.dirty = true
	w, err := b.startWorkload(ctx, "baseline")
	if err != nil {
		return err
	}
	t0 := time.Now()
	if err := w.hold(ctx, b.cfg.Load); err != nil {
		w.kill()
		return err
	}
	t1 := time.Now()
	// A margin after the window: pgbench's last buffered log lines are lost at stop.
	if err := w.hold(ctx, b.cfg.After); err != nil {
		w.kill()
		return err
	}
	l, err := w.stop()
	if err != nil {
		return err
	}
	s, err := l.window(t0, t1)
	if err != nil {
		return fmt.Errorf("baseline window: %w", err)
	}
	r.BaselineTPS, r.BaselineP50, r.BaselineP99, r.BaselineMax = some(s.TPS), some(s.P50ms), some(s.P99ms), some(s.MaxMs)
	errs := l.errorsBetween(t0, t1)
	r.BaselineErrors = some(float64(errs))
	if errs > 0 {
		r.note("baseline workload errors: %s", strings.Join(l.errors, "; "))
	}
	logf("baseline: %.0f TPS, p50 %.2f ms, p99 %.2f ms, max %.1f ms, %d errors", s.TPS, s.P50ms, s.P99ms, s.MaxMs, errs)
	return nil
}

// shadowctlMode measures one sync mode through the CLI: time to ready on an
// idle database (then abort), and under the workload: time to ready, the
// workload during the copy, at ready (sync only) and across the cutover, then
// finalize and reset.
func (b *bench) shadowctlMode(ctx context.Context, r *results, mode string, m *modeResult) error {
	if _, err := os.Stat(b.cfg.Bin); err != nil {
		m.allNone(fmt.Sprintf("%s not found (run `make build`)", b.cfg.Bin))
		return nil
	}
	if ok, why := b.hasCommand(ctx, "start"); !ok {
		m.allNone(why)
		return nil
	}
	if err := b.clean(ctx); err != nil {
		return err
	}
	if ir := b.shadowctl(ctx, mode+"-init", "init"); !ir.ok() {
		m.allNone(ir.reason())
		return nil
	}
	var rssKB int64
	// A start that never reaches ready must not hang the run: allow 30× the
	// raw limit, at least 3 minutes.
	startLimit := 3 * time.Minute
	if r.RawCopyS.known() {
		startLimit = max(startLimit, time.Duration(30*r.RawCopyS.val()*float64(time.Second)))
	}
	startArgs := func(id string) []string { return b.startArgs(mode, id) }

	hasCutover, why := b.hasCommand(ctx, "cutover")
	// Idle: time to ready, then abort; IdleReps times, the median is the
	// figure. Logical sync swaps from the stream once per migration, so the
	// first Swaps-1 idle runs also give a cutover each (cutoverAfterIdle):
	// with the load run's, their medians are the cutover figures.
	var idleCuts []swapSample
	sampleIdle := mode == "logical" && hasCutover && !b.cfg.Only["idle"]
	var idleRuns []float64
	var idleMachine []string
	var idleStatus map[string]any
	idleWhy := ""
	for rep := range b.cfg.IdleReps {
		idleID := "bench-" + mode + "-idle"
		if rep > 0 {
			idleID += "-" + strconv.Itoa(rep+1)
		}
		if b.cfg.Only == nil || b.cfg.Only["raw"] {
			if err := b.rawOnce(ctx, r, "before "+idleID); err != nil {
				return err
			}
		}
		logf("%s: start on an idle database", mode)
		started := time.Now()
		sr := b.shadowctlWithin(ctx, startLimit, idleID+"-start", startArgs(idleID)...)
		idleMachine = append(idleMachine, fmt.Sprintf("%.2f s: %s", sr.dur.Seconds(), b.cpuWindow(r, mode+"_idle_"+strconv.Itoa(rep+1), started, time.Now())))
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !sr.ok() {
			if !sr.notImplemented() {
				b.dirty = true
			}
			m.allNone(sr.reason())
			b.shadowctl(ctx, idleID+"-abort", "abort", idleID)
			return nil
		}
		b.dirty = true
		rssKB = max(rssKB, sr.maxRSSKB)
		idleRuns = append(idleRuns, sr.dur.Seconds())
		var str0 cliResult
		idleStatus, str0 = b.status(ctx, idleID)
		if idleStatus != nil && str(idleStatus, "phase") != "" && str(idleStatus, "phase") != "ready" {
			r.note("%s idle run: start exited 0 but phase is %q", mode, str(idleStatus, "phase"))
		} else if idleStatus == nil {
			idleWhy = str0.reason()
			r.note("%s idle run: %s", mode, idleWhy)
		}
		logf("%s: ready after %.2fs idle", mode, sr.dur.Seconds())
		swapped := false
		if sampleIdle && len(idleCuts) < b.cfg.Swaps-1 {
			c, rss, err := b.cutoverAfterIdle(ctx, r, mode, idleID, b.cfg.Rows)
			if err != nil {
				return err
			}
			rssKB = max(rssKB, rss)
			if swapped = c.holdKnown; swapped {
				idleCuts = append(idleCuts, c)
			}
		}
		// After a cutover the migration cannot be aborted; the clean below
		// drops the database (and the slot) anyway.
		if !swapped {
			if ar := b.shadowctl(ctx, idleID+"-abort", "abort", idleID); !ar.ok() {
				r.note("%s idle run: %s", mode, ar.reason())
			}
		}
		if err := b.clean(ctx); err != nil {
			return err
		}
	}
	m.CopyIdleS = some(median(idleRuns))
	if len(idleRuns) > 1 {
		r.note("%s time to ready, idle: %s s (the median is the figure)", mode, sortedFigures(idleRuns))
	}
	r.note("%s time to ready, idle, the machine during each run: %s", mode, strings.Join(idleMachine, "; "))

	if b.cfg.Only["idle"] {
		// The peak RSS and the verification's rate still hold (the 8M
		// scale run measures only at idle).
		b.finishMode(m, rssKB, nil, idleStatus, idleWhy, false)
		return nil
	}

	// Under load.
	loadID := "bench-" + mode + "-load"
	b.dirty = true
	w, tPre, err := b.underLoad(ctx, "shadowctl-"+mode)
	if err != nil {
		return err
	}
	defer w.kill()
	lag := &lagPoller{}
	pollCtx, stopPoll := context.WithCancel(ctx)
	defer stopPoll()
	var pollWG sync.WaitGroup
	if mode == "logical" {
		pollWG.Add(1)
		go func() { defer pollWG.Done(); b.pollLag(pollCtx, loadID, lag) }()
	}
	logf("%s: start under load", mode)
	t0 := time.Now()
	sr := b.shadowctlWithin(ctx, startLimit, loadID+"-start", startArgs(loadID)...)
	t1 := time.Now()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	rssKB = max(rssKB, sr.maxRSSKB)
	if !sr.ok() {
		stopPoll()
		pollWG.Wait()
		l, lerr := w.stop()
		if lerr != nil {
			return lerr
		}
		why := sr.reason()
		for _, f := range []*M{&m.CopyLoadS, &m.TPSRatio, &m.P99Ms, &m.SyncTPSRatio, &m.SyncAloneRatio, &m.BareConsumerRatio, &m.PlainTriggerRatio, &m.CutoverMaxLatencyMs, &m.FinalizeMaxLatencyMs,
			&m.LockWaitMs, &m.LockHoldMs, &m.LagP99S, &m.LagMaxS} {
			*f = none(why)
		}
		m.RefTPS = b.reference(l, tPre, t0, r)
		m.Errors = some(float64(l.errorsBetween(t0, t1)))
		b.finishMode(m, rssKB, nil, idleStatus, idleWhy, false)
		b.shadowctl(ctx, loadID+"-abort", "abort", loadID)
		return b.clean(ctx)
	}
	m.CopyLoadS = some(t1.Sub(t0).Seconds())
	// Logical sync: green stays current at ready only while a process
	// applies the stream (b.follow).
	stopFollow := func() int64 { return 0 }
	if mode == "logical" {
		stopFollow = b.follow(ctx, loadID, loadID+"-follow")
	}
	defer stopFollow()
	logf("%s: ready after %.2fs under load; sync-only window %s", mode, t1.Sub(t0).Seconds(), b.cfg.SyncWin)
	if err := w.holdOrNote(ctx, b.cfg.SyncWin, r, mode+" run, at ready"); err != nil {
		return err
	}
	t2 := time.Now()
	// Trigger sync: the same window again with the plain upsert
	// trigger in its place, the reference for what keeping green current
	// by trigger costs the application on this machine.
	// Then trigger sync's own function for one more window: the two
	// sync-only windows bracket the plain trigger's, so a drift of the
	// host's speed over the three weighs on both sides alike (the plain
	// trigger's window always came second, and read from 0.11 above to
	// 0.05 below the sync-only one before it in three runs of one code).
	var tp0, tp1, ts0, ts1 time.Time
	if mode == "trigger" {
		var restoreErr error
		if tp0, tp1, restoreErr, err = b.windowWith(ctx, w, r, mode+" run, at ready, plain trigger", b.plainTrigger); err != nil {
			return err
		}
		if restoreErr != nil {
			return restoreErr
		}
		if !tp0.IsZero() {
			ts0 = time.Now()
			if err := w.holdOrNote(ctx, b.cfg.SyncWin, r, mode+" run, at ready, after the plain trigger"); err != nil {
				return err
			}
			ts1 = time.Now()
		}
	}
	// Logical sync: the same window again with the stream not applied (the
	// follower stopped, the slot keeping the changes for the cutover, which
	// applies them itself): the workload alone on a table as old as at
	// ready. The reference was taken minutes and a million updates earlier,
	// on a freshly cloned table, and the workload alone slows down over such
	// a stretch too.
	var t2b, tb0, tb1 time.Time
	if mode == "logical" {
		rssKB = max(rssKB, stopFollow())
		if err := w.holdOrNote(ctx, b.cfg.SyncWin, r, mode+" run, at ready, stream paused"); err != nil {
			return err
		}
		t2b = time.Now()
		// Then PostgreSQL's own consumer alone, nothing applied: the
		// floor under the sync-only ratio on this machine.
		var stopErr error
		if tb0, tb1, stopErr, err = b.windowWith(ctx, w, r, mode+" run, at ready, bare pgoutput consumer", b.bareConsumer); err != nil {
			return err
		}
		if stopErr != nil {
			r.note("%s run: %v", mode, stopErr)
			tb0 = time.Time{}
		}
		// The cutover then meets the stream as the daemon leaves it: a
		// follower running and caught up. (Without one, the cutover applies
		// the backlog itself, and in the runs that measured it the swap
		// held its lock for 430–600 ms instead of 20–30 ms.)
		stopFollow = b.follow(ctx, loadID, loadID+"-follow-again")
		defer stopFollow()
		if err := b.waitCaughtUp(ctx, loadID, time.Minute); err != nil {
			r.note("%s run: %v", mode, err)
		}
	}
	var cr cliResult
	swaps := 1
	if mode == "trigger" {
		swaps = b.cfg.Swaps
	}
	var cuts []swapSample
	for k := 0; hasCutover && k < swaps; k++ {
		label := loadID + "-cutover"
		if k > 0 {
			// Back to blue, the workload on blue for a moment, then the next
			// cutover.
			label += "-" + strconv.Itoa(k+1)
			rb := b.shadowctlWithin(ctx, 2*time.Minute, loadID+"-rollback-"+strconv.Itoa(k), "rollback", loadID, "--lock-timeout", "100ms")
			rssKB = max(rssKB, rb.maxRSSKB)
			if !rb.ok() {
				r.note("%s load run: rollback %d: %s", mode, k, rb.reason())
				break
			}
			if err := w.holdOrNote(ctx, b.cfg.After, r, mode+" run, after rollback"); err != nil {
				return err
			}
		}
		var c swapSample
		c, cr = b.cutover(ctx, loadID, label)
		rssKB = max(rssKB, cr.maxRSSKB)
		if !cr.ok() {
			break
		}
		if c.holdKnown {
			r.note("%s run, cutover %d: %s", mode, len(cuts)+1, c)
		}
		cuts = append(cuts, c)
	}
	rssKB = max(rssKB, stopFollow())
	if err := w.holdOrNote(ctx, b.cfg.After, r, mode+" run, after cutover"); err != nil {
		return err
	}
	t3 := time.Now()
	stopPoll()
	pollWG.Wait()
	loadStatus, stR := b.status(ctx, loadID)
	// Finalize with the workload still running: it validates green's
	// foreign keys (a join of the whole table), which the cutover leaves
	// to it, and its swap is the last lock the application meets.
	var tf0, tf1, ta0, ta1 time.Time
	finalized := false
	if hasCutover && cr.ok() {
		tf0 = time.Now()
		fr := b.shadowctl(ctx, loadID+"-finalize", "finalize", loadID, "--force")
		tf1 = time.Now()
		rssKB = max(rssKB, fr.maxRSSKB)
		if finalized = fr.ok(); !finalized {
			r.note("%s load run: %s", mode, fr.reason())
		}
		// The pgbench log must cover the window's end: transactions are
		// logged when they finish.
		if err := w.holdOrNote(ctx, 2*time.Second, r, mode+" run, after finalize"); err != nil {
			return err
		}
		// Then the workload alone once more, on the finished table, nothing
		// of shadowctl's left: the far side of a bracket around every
		// window since the reference (afterDrift). The references of one
		// run's modes differed by up to a fifth, and trigger sync, which
		// cannot be paused, has no other window alone after its start; this
		// one says whether the workload alone drifted within the mode's run.
		if finalized {
			ta0 = time.Now()
			if err := w.holdOrNote(ctx, b.cfg.SyncWin, r, mode+" run, the workload alone after finalize"); err != nil {
				return err
			}
			ta1 = time.Now()
			if err := w.holdOrNote(ctx, time.Second, r, mode+" run, after the window alone"); err != nil {
				return err
			}
		}
	}
	l, err := w.stop()
	if err != nil {
		return err
	}
	ref := b.reference(l, tPre, t0, r)
	m.RefTPS = ref
	// The workload's own worst transaction with nothing of shadowctl's
	// running: what the cutover's max latency is to be read against (it
	// grows with the table too).
	if s, err := l.window(tPre, t0); err == nil {
		r.note("%s load run, the workload alone (reference window): max latency %.1f ms, p99 %.2f ms", mode, s.MaxMs, s.P99ms)
	}
	r.note("%s load run, the machine: reference window %s; start to ready %s; sync only %s", mode,
		b.cpuWindow(r, mode+"_reference", tPre, t0), b.cpuWindow(r, mode+"_copy", t0, t1), b.cpuWindow(r, mode+"_sync", t1, t2))
	if s, err := l.window(t0, t1); err == nil {
		m.TPSRatio = ratio(some(s.TPS), ref)
		m.P99Ms = some(s.P99ms)
	} else {
		m.TPSRatio, m.P99Ms = none(err.Error()), none(err.Error())
	}
	r.note("%s load run, the workload in each step from start to ready (TPS, share of the reference): %s", mode, stepRatios(l, sr.events, t0, t1, ref))
	if s, err := l.window(t1, t2); err == nil {
		m.SyncTPSRatio = ratio(some(s.TPS), ref)
		if !ts0.IsZero() {
			// Trigger sync: the mean of the windows before and after the
			// plain trigger's.
			if s2, err := l.window(ts0, ts1); err == nil {
				m.SyncTPSRatio = ratio(some((s.TPS+s2.TPS)/2), ref)
				r.note("%s load run, sync only: %.0f TPS before the plain trigger's window, %.0f after it (the machine %s)", mode, s.TPS, s2.TPS,
					b.cpuWindow(r, mode+"_sync_after", ts0, ts1))
			} else {
				r.note("%s load run, the sync-only window after the plain trigger's: %v; the figure is the window before it", mode, err)
			}
		}
		m.SyncAloneRatio = none("trigger sync cannot be paused: it runs in the application's transactions")
		m.BareConsumerRatio = none("not applicable: trigger sync reads no stream")
		m.PlainTriggerRatio = none("not applicable: logical sync runs no trigger")
		if mode == "trigger" {
			m.PlainTriggerRatio = none("the plain trigger did not run (see the notes)")
			if !tp0.IsZero() {
				if p, err := l.window(tp0, tp1); err == nil {
					m.PlainTriggerRatio = ratio(some(p.TPS), ref)
					r.note("%s load run, the plain trigger's window: %.0f TPS, the machine %s", mode, p.TPS, b.cpuWindow(r, mode+"_plain_trigger", tp0, tp1))
				} else {
					m.PlainTriggerRatio = none(err.Error())
				}
			}
		}
		if mode == "logical" {
			if a, err := l.window(t2, t2b); err == nil {
				m.SyncAloneRatio = ratio(some(s.TPS), some(a.TPS))
				m.BareConsumerRatio = none("the bare consumer did not run (see the notes)")
				if !tb0.IsZero() {
					if c, err := l.window(tb0, tb1); err == nil {
						m.BareConsumerRatio = ratio(some(c.TPS), some(a.TPS))
					} else {
						m.BareConsumerRatio = none(err.Error())
					}
				}
			} else {
				m.SyncAloneRatio, m.BareConsumerRatio = none(err.Error()), none(err.Error())
			}
		}
	} else {
		m.SyncTPSRatio, m.SyncAloneRatio, m.BareConsumerRatio, m.PlainTriggerRatio = none(err.Error()), none(err.Error()), none(err.Error()), none(err.Error())
	}
	switch {
	case !hasCutover:
		m.CutoverMaxLatencyMs, m.LockWaitMs, m.LockHoldMs = none(why), none(why), none(why)
	case !cr.ok():
		m.CutoverMaxLatencyMs, m.LockWaitMs, m.LockHoldMs = none(cr.reason()), none(cr.reason()), none(cr.reason())
	default:
		m.CutoverMaxLatencyMs = l.maxLatency(cuts[0].from, cuts[0].to)
	}
	m.AloneAfterRatio = none("no finalize ran (no cutover)")
	if !ta0.IsZero() {
		m.AloneAfterRatio = b.afterDrift(l, r, mode, ref, ta0, ta1, []driftWindow{
			{"during the copy", t0, t1}, {"sync only", t1, t2}, {"sync only after the plain trigger", ts0, ts1}, {"the plain trigger", tp0, tp1}, {"alone at ready (stream paused)", t2, t2b}})
	}
	m.FinalizeMaxLatencyMs = none("no finalize ran (no cutover)")
	if !tf0.IsZero() {
		m.FinalizeMaxLatencyMs = l.maxLatency(tf0, tf1)
		r.note("%s run: finalize took %.2f s under load", mode, tf1.Sub(tf0).Seconds())
	}
	tEnd := t3
	if tf1.After(tEnd) {
		tEnd = tf1
	}
	errs := l.errorsBetween(t0, tEnd)
	for _, c := range idleCuts {
		errs += c.errors
	}
	m.Errors = some(float64(errs))
	if errs > 0 {
		r.note("%s run: %d workload errors: %s", mode, errs, strings.Join(l.errors, "; "))
	}
	if mode == "logical" {
		m.LagP99S, m.LagMaxS = lag.figures()
	}
	loadWhy := ""
	if loadStatus == nil {
		loadWhy = stR.reason()
		r.note("%s load run: %s", mode, loadWhy)
	}
	b.finishMode(m, rssKB, loadStatus, idleStatus, loadWhy, hasCutover && cr.ok())
	if hasCutover && cr.ok() && len(cuts)+len(idleCuts) > 1 {
		for i := range cuts {
			cuts[i].maxLat = l.maxLatency(cuts[i].from, cuts[i].to)
		}
		how := "each after a rollback but the first"
		if mode == "logical" {
			how = "the load run's, then one after each of the first idle runs (the workload started at ready)"
		}
		b.swapMedians(m, append(cuts, idleCuts...), mode, how, r)
	}
	if !finalized {
		if ar := b.shadowctl(ctx, loadID+"-abort", "abort", loadID); !ar.ok() {
			r.note("%s load run: %s", mode, ar.reason())
		}
	}
	return b.clean(ctx)
}

// swapSample is one cutover: the command's window, and the lock wait and
// hold its status reported.
type swapSample struct {
	from, to   time.Time
	wait, hold float64
	holdKnown  bool
	// Parts of the hold, from status: the commit, and (logical sync) the
	// catch-up under the lock.
	commit, catchUp float64
	// maxLat is the workload's longest transaction over the window, cut
	// from the log of the workload that ran around it; errors (a cutover
	// after an idle run) are its workload's failed transactions.
	maxLat M
	errors int
}

// cutover runs `shadowctl cutover` for one migration and reads the swap's
// figures from its status.
func (b *bench) cutover(ctx context.Context, id, label string) (swapSample, cliResult) {
	c := swapSample{from: time.Now()}
	cr := b.shadowctlWithin(ctx, 2*time.Minute, label, "cutover", id, "--lock-timeout", "100ms")
	c.to = time.Now()
	if !cr.ok() {
		return c, cr
	}
	if st, _ := b.status(ctx, id); st != nil {
		c.wait, _ = num(st, "last_cutover", "lock_wait_ms")
		c.hold, c.holdKnown = num(st, "last_cutover", "lock_hold_ms")
		c.commit, _ = num(st, "last_cutover", "commit_ms")
		c.catchUp, _ = num(st, "last_cutover", "catch_up_under_lock_ms")
	}
	return c, cr
}

// follow runs `shadowctl follow` for a logical migration, as the daemon
// would: it applies the stream until stopped, and survives the cutover (it
// stops once the cutover has replaced the stream). stop returns its peak RSS.
func (b *bench) follow(ctx context.Context, id, label string) (stop func() int64) {
	fctx, cancel := context.WithCancel(ctx)
	done := make(chan cliResult, 1)
	go func() { done <- b.shadowctl(fctx, label, "follow", id) }()
	return sync.OnceValue(func() int64 { cancel(); return (<-done).maxRSSKB })
}

// cutoverAfterIdle is one more cutover sample, made on a migration an idle
// run has just brought to ready, on a table of rows rows: the workload
// starts, (logical sync) a follower applies the stream for cfg.After and
// catches up, then the cutover, as in the load run. (Nothing is measured before the cutover: a longer lead-in
// only lengthens the run, past 3 minutes in the quick mode.) Only the first
// cutover of a logical migration drains the stream, so a median of several
// needs a migration each, and the idle runs' copies are already there. A sample that fails is noted and left
// out; only an interrupted run or a harness failure is an error.
func (b *bench) cutoverAfterIdle(ctx context.Context, r *results, mode, id string, rows int) (swapSample, int64, error) {
	w, err := b.startWorkloadOn(ctx, "shadowctl-"+id, rows)
	if err != nil {
		return swapSample{}, 0, err
	}
	defer w.kill()
	stopFollow := func() int64 { return 0 }
	if mode == "logical" {
		stopFollow = b.follow(ctx, id, id+"-follow")
	}
	defer stopFollow()
	t0 := time.Now()
	what := mode + " idle run " + id + ", cutover sample"
	if err := w.holdOrNote(ctx, b.cfg.After, r, what); err != nil {
		return swapSample{}, 0, err
	}
	if mode == "logical" {
		if err := b.waitCaughtUp(ctx, id, time.Minute); err != nil {
			r.note("%s: %v", what, err)
		}
	}
	c, cr := b.cutover(ctx, id, id+"-cutover")
	rssKB := max(cr.maxRSSKB, stopFollow())
	if err := w.holdOrNote(ctx, b.cfg.After, r, what); err != nil {
		return swapSample{}, rssKB, err
	}
	// Errors through the window after the swap too, as in the load run:
	// that is when the application first meets the view.
	tEnd := time.Now()
	l, err := w.stop()
	if err != nil {
		return swapSample{}, rssKB, err
	}
	c.errors = l.errorsBetween(t0, tEnd)
	switch {
	case !cr.ok():
		r.note("%s: %s", what, cr.reason())
		c.holdKnown = false
	case !c.holdKnown:
		r.note("%s: status has no last_cutover.lock_hold_ms", what)
	default:
		c.maxLat = l.maxLatency(c.from, c.to)
		r.note("%s: %s; workload max latency %s ms", what, c, fmtM(c.maxLat, "ms"))
	}
	if c.errors > 0 {
		r.note("%s: %d workload errors: %s", what, c.errors, strings.Join(l.errors, "; "))
	}
	return c, rssKB, nil
}

// String breaks the hold down for the notes.
func (c swapSample) String() string {
	return fmt.Sprintf("hold %.1f ms = catch-up under the lock %.1f + commit %.1f + statements and the rest %.1f",
		c.hold, c.catchUp, c.commit, c.hold-c.catchUp-c.commit)
}

// swapMedians makes the cutover figures the medians of several cutovers (see
// config.Swaps), and lists every one in the notes; how says where they came
// from.
func (b *bench) swapMedians(m *modeResult, cuts []swapSample, mode, how string, r *results) {
	var lats, waits, holds []float64
	for _, c := range cuts {
		if !c.maxLat.known() || !c.holdKnown {
			r.note("%s run: cutover figures of one swap only (a swap's window or status was not readable)", mode)
			return
		}
		lats, waits, holds = append(lats, c.maxLat.val()), append(waits, c.wait), append(holds, c.hold)
	}
	m.CutoverMaxLatencyMs, m.LockWaitMs, m.LockHoldMs = some(median(lats)), some(median(waits)), some(median(holds))
	r.note("%s run: %d cutovers, %s; the medians are the figures: workload max latency %s ms, lock hold %s ms, lock wait %s ms",
		mode, len(cuts), how, sortedFigures(lats), sortedFigures(holds), sortedFigures(waits))
}

// median is the middle value; of an even number of values, the mean of the
// middle two (taking the upper one made every two-run figure its maximum).
func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 0 {
		return (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return s[len(s)/2]
}

// finishMode fills the figures read from status JSON (load run first, idle
// run as fallback for verification) and the peak RSS.
func (b *bench) finishMode(m *modeResult, rssKB int64, load, idle map[string]any, statusWhy string, cutoverOK bool) {
	if rssKB > 0 {
		m.PeakRSSMB = some(float64(rssKB) / 1024)
	} else {
		m.PeakRSSMB = none("no peak RSS read for the shadowctl processes")
	}
	if load == nil && cutoverOK {
		m.LockWaitMs, m.LockHoldMs = none(statusWhy), none(statusWhy)
	}
	if load != nil && cutoverOK {
		if v, ok := num(load, "last_cutover", "lock_wait_ms"); ok {
			m.LockWaitMs = some(v)
		} else {
			m.LockWaitMs = none("status JSON has no last_cutover.lock_wait_ms")
		}
		if v, ok := num(load, "last_cutover", "lock_hold_ms"); ok {
			m.LockHoldMs = some(v)
		} else {
			m.LockHoldMs = none("status JSON has no last_cutover.lock_hold_ms")
		}
	}
	m.VerifyRowsPerS = none("status JSON has no verify.rows / verify.seconds")
	if load == nil && idle == nil {
		m.VerifyRowsPerS = none(statusWhy)
	}
	for _, st := range []map[string]any{load, idle} {
		rows, ok1 := num(st, "verify", "rows")
		secs, ok2 := num(st, "verify", "seconds")
		if ok1 && ok2 && secs > 0 {
			m.VerifyRowsPerS = some(rows / secs)
			break
		}
	}
}

// reference is the workload's TPS in the same pgbench run just before the
// measured operation starts: the baseline the ratios divide by. Taken from the
// same run, it cancels the drift between scenarios (table growth, bloat, the
// machine's other load) that a ratio to the opening baseline would carry.
func (b *bench) reference(l *txlog, from, to time.Time, r *results) M {
	s, err := l.window(from, to)
	if err != nil {
		return none("reference window: " + err.Error())
	}
	if r.BaselineTPS.known() && s.TPS < 0.8*r.BaselineTPS.val() {
		r.note("reference window %s–%s: %.0f TPS, under 80%% of the opening baseline (%.0f): the machine was busier",
			from.Format("15:04:05"), to.Format("15:04:05"), s.TPS, r.BaselineTPS.val())
	}
	return some(s.TPS)
}

// lagPoller collects sync_lag_seconds samples from status JSON.
type lagPoller struct {
	mu      sync.Mutex
	samples []float64
	why     string
}

// waitCaughtUp waits until the migration's sync lag is under a second.
func (b *bench) waitCaughtUp(ctx context.Context, id string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		if st, _ := b.status(ctx, id); st != nil {
			if v, ok := num(st, "sync_lag_seconds"); ok && v < 1 {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the restarted follower did not catch up within %s", limit)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

func (b *bench) pollLag(ctx context.Context, id string, lp *lagPoller) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		st, _ := b.status(ctx, id)
		if st == nil {
			continue
		}
		v, ok := num(st, "sync_lag_seconds")
		lp.mu.Lock()
		if ok {
			lp.samples = append(lp.samples, v)
		} else {
			lp.why = "status JSON has no sync_lag_seconds"
		}
		lp.mu.Unlock()
	}
}

func (lp *lagPoller) figures() (p99, maxv M) {
	lp.mu.Lock()
	defer lp.mu.Unlock()
	if len(lp.samples) == 0 {
		why := lp.why
		if why == "" {
			why = "no status sample while the sync ran"
		}
		return none(why), none(why)
	}
	s := append([]float64(nil), lp.samples...)
	sort.Float64s(s)
	idx := min(max(int(float64(len(s))*0.99+0.999999)-1, 0), len(s)-1)
	return some(s[idx]), some(s[len(s)-1])
}

// repack runs pg_repack --table orders under the workload, installing the
// Debian package when missing and running as root.
func (b *bench) repack(ctx context.Context, r *results) error {
	fail := func(why string) error {
		r.RepackS, r.RepackTPSRatio, r.RepackMaxMs, r.RepackErrors = none(why), none(why), none(why), none(why)
		return nil
	}
	bin, why := b.ensureRepack(ctx)
	if bin == "" {
		return fail(why)
	}
	if err := b.clean(ctx); err != nil {
		return err
	}
	if _, err := b.pool.Exec(ctx, "CREATE EXTENSION IF NOT EXISTS pg_repack"); err != nil {
		return fail(fmt.Sprintf("CREATE EXTENSION pg_repack: %v", err))
	}
	b.dirty = true
	w, tPre, err := b.underLoad(ctx, "repack")
	if err != nil {
		return err
	}
	defer w.kill()
	t0 := time.Now()
	cmd := exec.CommandContext(ctx, bin, "-h", b.host, "-p", strconv.Itoa(int(b.port)), "-U", "postgres",
		"-d", benchDB, "--table", "public.orders")
	out, rerr := cmd.CombinedOutput()
	t1 := time.Now()
	_ = os.WriteFile(filepath.Join(b.work, "pg_repack.out"), out, 0o644)
	if err := w.holdOrNote(ctx, b.cfg.After, r, "pg_repack run"); err != nil {
		return err
	}
	t2 := time.Now()
	l, err := w.stop()
	if err != nil {
		return err
	}
	if rerr != nil {
		return fail(fmt.Sprintf("pg_repack failed: %v: %s", rerr, tail(string(out), 300)))
	}
	s, err := l.window(t0, t1)
	if err != nil {
		return fail(err.Error())
	}
	r.RepackS = some(t1.Sub(t0).Seconds())
	r.RepackTPSRatio = ratio(some(s.TPS), b.reference(l, tPre, t0, r))
	r.RepackMaxMs = some(s.MaxMs)
	r.RepackErrors = some(float64(l.errorsBetween(t0, t2)))
	logf("pg_repack: %.2fs, %.0f TPS, max latency %.1f ms", t1.Sub(t0).Seconds(), s.TPS, s.MaxMs)
	return nil
}

// ensureRepack finds pg_repack beside the server, or installs
// postgresql-<major>-repack with apt-get when root. It returns "" and the
// reason when it cannot.
func (b *bench) ensureRepack(ctx context.Context) (string, string) {
	bin := filepath.Join(b.srv.BinDir, "pg_repack")
	if _, err := os.Stat(bin); err == nil {
		return bin, ""
	}
	if os.Geteuid() != 0 {
		return "", "pg_repack is not installed and the bench is not root (apt-get install postgresql-<major>-repack)"
	}
	if _, err := exec.LookPath("apt-get"); err != nil {
		return "", "pg_repack is not installed and there is no apt-get"
	}
	var major int
	if err := b.pool.QueryRow(ctx, "SELECT current_setting('server_version_num')::int / 10000").Scan(&major); err != nil {
		return "", fmt.Sprintf("server version: %v", err)
	}
	pkg := fmt.Sprintf("postgresql-%d-repack", major)
	logf("installing %s", pkg)
	install := func() ([]byte, error) {
		c := exec.CommandContext(ctx, "apt-get", "install", "-y", "-qq", pkg)
		c.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		return c.CombinedOutput()
	}
	out, err := install()
	if err != nil {
		// The package lists may be missing or stale on a fresh machine.
		if uout, uerr := exec.CommandContext(ctx, "apt-get", "update", "-qq").CombinedOutput(); uerr != nil {
			return "", fmt.Sprintf("apt-get update failed: %v: %s", uerr, tail(string(uout), 200))
		}
		if out, err = install(); err != nil {
			return "", fmt.Sprintf("apt-get install %s failed: %v: %s", pkg, err, tail(string(out), 200))
		}
	}
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Sprintf("%s installed but %s is missing", pkg, bin)
	}
	return bin, ""
}

// offlineAlter is the stall shadowctl exists to avoid: the plain ALTER under
// the workload. It runs last, since it changes the table.
func (b *bench) offlineAlter(ctx context.Context, r *results) error {
	if err := b.clean(ctx); err != nil {
		return err
	}
	b.dirty = true
	w, tPre, err := b.underLoad(ctx, "offline-alter")
	if err != nil {
		return err
	}
	defer w.kill()
	t0 := time.Now()
	_, aerr := b.pool.Exec(ctx, "ALTER TABLE public.orders "+alterSpec)
	t1 := time.Now()
	if err := w.holdOrNote(ctx, b.cfg.After, r, "offline ALTER run"); err != nil {
		return err
	}
	t2 := time.Now()
	l, err := w.stop()
	if err != nil {
		return err
	}
	if aerr != nil {
		return fmt.Errorf("offline ALTER: %w", aerr)
	}
	s, err := l.window(t0, t1)
	if err != nil {
		// Nothing completed while the table was locked: the stall spans the whole ALTER.
		s, err = l.window(t0, t2)
		if err != nil {
			return fmt.Errorf("offline ALTER window: %w", err)
		}
	}
	r.OfflineS = some(t1.Sub(t0).Seconds())
	r.OfflineMaxMs = some(s.MaxMs)
	if st, err := l.window(t0, t1); err == nil {
		r.OfflineTPSRatio = ratio(some(st.TPS), b.reference(l, tPre, t0, r))
	} else {
		r.OfflineTPSRatio = some(0)
	}
	r.OfflineErrors = some(float64(l.errorsBetween(t0, t2)))
	logf("offline ALTER: %.2fs, workload max latency %.1f ms", t1.Sub(t0).Seconds(), s.MaxMs)
	return nil
}

// windowWith holds one window of the workload with something started in
// the application's way (a plain trigger, a bare consumer) and undone right
// after it. A start that fails is noted and gives zero times; undoErr is
// the undo's own failure, for the caller to weigh; err ends the run.
func (b *bench) windowWith(ctx context.Context, w *workload, r *results, what string, start func(context.Context) (func() error, error)) (t0, t1 time.Time, undoErr, err error) {
	undo, serr := start(ctx)
	if serr != nil {
		r.note("%s: %v", what, serr)
		return time.Time{}, time.Time{}, nil, nil
	}
	t0 = time.Now()
	err = w.holdOrNote(ctx, b.cfg.SyncWin, r, what)
	t1 = time.Now()
	return t0, t1, undo(), err
}

// driftWindow is one window of a load run, read again against the bracket
// of the two windows alone (afterDrift).
type driftWindow struct {
	what     string
	from, to time.Time
}

// afterDrift reads the window of the workload alone after finalize, from ta0
// to ta1, against the reference before start, and notes each of ws (those
// that ran) against the mean of the two: what the figures would read if the
// workload alone drifted evenly between the ends. The targets keep the
// reference before start; this says how much of a ratio is the drift.
func (b *bench) afterDrift(l *txlog, r *results, mode string, ref M, ta0, ta1 time.Time, ws []driftWindow) M {
	a, err := l.window(ta0, ta1)
	if err != nil {
		return none(err.Error())
	}
	after := ratio(some(a.TPS), ref)
	if !ref.known() {
		return after
	}
	bracket := (ref.val() + a.TPS) / 2
	var parts []string
	for _, w := range ws {
		if w.from.IsZero() || w.to.IsZero() {
			continue
		}
		if s, err := l.window(w.from, w.to); err == nil {
			parts = append(parts, fmt.Sprintf("%s %.2f", w.what, s.TPS/bracket))
		}
	}
	r.note("%s load run, the workload alone after finalize: %.0f TPS, %.2f of the reference (the machine %s); against the mean of the two windows alone (%.0f TPS): %s",
		mode, a.TPS, after.val(), b.cpuWindow(r, mode+"_alone_after", ta0, ta1), bracket, strings.Join(parts, ", "))
	return after
}
