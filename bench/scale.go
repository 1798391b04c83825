package main

import (
	"context"
	"fmt"
	"time"
)

// scaleIdle times each mode's start to ready at idle on the table of
// BENCH_SCALE_FROM rows and on the full one, alternately (the smaller
// first), IdleReps times each. The ratio of the two medians is the scale
// target's time to ready measured in one run: two runs minutes apart
// compare the host's speed at two moments as much as two sizes (on one
// afternoon trigger sync's time to ready at 2,000,000 rows went from 4.7 s
// to 7.1 s with the same code). Each migration is then swapped under the
// workload (cutoverAfterIdle), so the swap's figures at the two sizes
// come from the same minutes too: the medians of each size's cutovers are
// the "no larger at 8,000,000 rows" target's.
func (b *bench) scaleIdle(ctx context.Context, r *results) error {
	for _, mode := range []struct {
		name string
		m    *modeResult
	}{{"trigger", &r.Trigger}, {"logical", &r.Logical}} {
		if b.cfg.Only != nil && !b.cfg.Only[mode.name] {
			mode.m.ScaleIdleRatio = none("not run (BENCH_ONLY)")
			mode.m.ScaleSwaps = [2]scaleSwaps{noScaleSwaps("not run (BENCH_ONLY)"), noScaleSwaps("not run (BENCH_ONLY)")}
			continue
		}
		var small, large []float64
		var cuts [2][]swapSample
		var failed string
		for rep := 1; rep <= b.cfg.IdleReps && failed == ""; rep++ {
			for i, size := range []struct {
				seed string
				rows int
				into *[]float64
			}{{smallSeedDB, b.cfg.ScaleFrom, &small}, {seedDB, b.cfg.Rows, &large}} {
				id := fmt.Sprintf("bench-%s-scale-%d-%d", mode.name, size.rows, rep)
				d, rssKB, why, err := b.idleOnce(ctx, mode.name, size.seed, id)
				if err != nil {
					return err
				}
				if why != "" {
					failed = why
					break
				}
				logf("%s: ready after %.2fs idle at %d rows", mode.name, d.Seconds(), size.rows)
				*size.into = append(*size.into, d.Seconds())
				c, cutRSSKB, err := b.cutoverAfterIdle(ctx, r, mode.name, id, size.rows)
				if err != nil {
					return err
				}
				// "≤ 100 MB at any size": these runs count too.
				if mb := float64(max(rssKB, cutRSSKB)) / 1024; !mode.m.PeakRSSMB.known() || mb > mode.m.PeakRSSMB.val() {
					mode.m.PeakRSSMB = some(mb)
				}
				if c.holdKnown && c.maxLat.known() {
					cuts[i] = append(cuts[i], c)
				}
			}
		}
		if failed != "" {
			mode.m.ScaleIdleRatio = none(failed)
			mode.m.ScaleSwaps = [2]scaleSwaps{noScaleSwaps(failed), noScaleSwaps(failed)}
			r.note("%s scale at idle: %s", mode.name, failed)
			continue
		}
		mode.m.ScaleIdleRatio = some(median(large) / median(small))
		r.note("%s time to ready at idle, alternately at %d and %d rows in this run: %s s and %s s; the medians' ratio %.2f",
			mode.name, b.cfg.ScaleFrom, b.cfg.Rows, sortedFigures(small), sortedFigures(large), mode.m.ScaleIdleRatio.val())
		for i, rows := range []int{b.cfg.ScaleFrom, b.cfg.Rows} {
			mode.m.ScaleSwaps[i] = scaleSwapsOf(cuts[i], b.cfg.IdleReps)
			r.note("%s cutovers after those idle runs at %d rows: %s", mode.name, rows, mode.m.ScaleSwaps[i])
		}
	}
	// Later scenarios start from the full table again.
	b.dirty = true
	return b.clean(ctx)
}

// scaleSwaps is the median swap of one size's cutovers in the in-run scale
// comparison.
type scaleSwaps struct {
	MaxLatencyMs M `json:"cutover_max_latency_ms"`
	LockHoldMs   M `json:"lock_hold_ms"`
	lats, holds  []float64
}

func noScaleSwaps(why string) scaleSwaps {
	return scaleSwaps{MaxLatencyMs: none(why), LockHoldMs: none(why)}
}

// scaleSwapsOf takes the medians of cuts; fewer than want readable samples
// (a swap that failed is noted where it happened) leaves them unmeasured.
func scaleSwapsOf(cuts []swapSample, want int) scaleSwaps {
	if len(cuts) < want {
		return noScaleSwaps(fmt.Sprintf("%d of %d cutovers readable", len(cuts), want))
	}
	var s scaleSwaps
	for _, c := range cuts {
		s.lats, s.holds = append(s.lats, c.maxLat.val()), append(s.holds, c.hold)
	}
	s.MaxLatencyMs, s.LockHoldMs = some(median(s.lats)), some(median(s.holds))
	return s
}

func (s scaleSwaps) String() string {
	if !s.LockHoldMs.known() {
		return whyNot(s.LockHoldMs)
	}
	return fmt.Sprintf("workload max latency %s ms, lock hold %s ms (medians %.1f and %.1f)",
		sortedFigures(s.lats), sortedFigures(s.holds), s.MaxLatencyMs.val(), s.LockHoldMs.val())
}

// idleOnce runs one `start --until ready` on an idle clone of seed and
// leaves the migration at ready (the next clone drops it). why says what
// went wrong when the CLI did.
func (b *bench) idleOnce(ctx context.Context, mode, seed, id string) (d time.Duration, rssKB int64, why string, err error) {
	if err := b.freshFrom(ctx, seed); err != nil {
		return 0, 0, "", err
	}
	b.dirty = true
	if err := b.checkpoint(ctx); err != nil {
		return 0, 0, "", err
	}
	if ir := b.shadowctl(ctx, id+"-init", "init"); !ir.ok() {
		return 0, 0, ir.reason(), nil
	}
	sr := b.shadowctlWithin(ctx, 30*time.Minute, id+"-start", b.startArgs(mode, id)...)
	if ctx.Err() != nil {
		return 0, 0, "", ctx.Err()
	}
	if !sr.ok() {
		return 0, 0, sr.reason(), nil
	}
	return sr.dur, sr.maxRSSKB, "", nil
}

// startArgs is the `shadowctl start` of every measured run.
func (b *bench) startArgs(mode, id string) []string {
	args := []string{"start", "--table", "public.orders", "--alter", alterSpec, "--sync", mode, "--until", "ready", "--name", id}
	return append(args, b.cfg.StartArgs...)
}
