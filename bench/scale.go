package main

import (
	"context"
	"fmt"
	"strings"
	"time"
)

// scaleIdle times each mode's start to ready at idle on the table of
// BENCH_SCALE_FROM rows and on the full one, alternately (the smaller
// first), IdleReps times each. The ratio of the two medians is the scale
// target's time to ready measured in one run: two runs minutes apart
// compare the host's speed at two moments as much as two sizes (on one
// afternoon trigger sync's time to ready at 2,000,000 rows went from 4.7 s
// to 7.1 s with the same code).
func (b *bench) scaleIdle(ctx context.Context, r *results) error {
	for _, mode := range []struct {
		name string
		m    *modeResult
	}{{"trigger", &r.Trigger}, {"logical", &r.Logical}} {
		if b.cfg.Only != nil && !b.cfg.Only[mode.name] {
			mode.m.ScaleIdleRatio = none("not run (BENCH_ONLY)")
			continue
		}
		var small, large []float64
		var failed string
		for rep := 1; rep <= b.cfg.IdleReps && failed == ""; rep++ {
			for _, size := range []struct {
				seed string
				rows int
				into *[]float64
			}{{smallSeedDB, b.cfg.ScaleFrom, &small}, {seedDB, b.cfg.Rows, &large}} {
				d, why, err := b.idleOnce(ctx, mode.name, size.seed, fmt.Sprintf("bench-%s-scale-%d-%d", mode.name, size.rows, rep))
				if err != nil {
					return err
				}
				if why != "" {
					failed = why
					break
				}
				logf("%s: ready after %.2fs idle at %d rows", mode.name, d.Seconds(), size.rows)
				*size.into = append(*size.into, d.Seconds())
			}
		}
		if failed != "" {
			mode.m.ScaleIdleRatio = none(failed)
			r.note("%s scale at idle: %s", mode.name, failed)
			continue
		}
		mode.m.ScaleIdleRatio = some(median(large) / median(small))
		r.note("%s time to ready at idle, alternately at %d and %d rows in this run: %s s and %s s; the medians' ratio %.2f",
			mode.name, b.cfg.ScaleFrom, b.cfg.Rows, secondsList(small), secondsList(large), mode.m.ScaleIdleRatio.val())
	}
	// Later scenarios start from the full table again.
	b.dirty = true
	return b.clean(ctx)
}

// idleOnce runs one `start --until ready` on an idle clone of seed, then
// aborts it. why says what went wrong when the CLI did.
func (b *bench) idleOnce(ctx context.Context, mode, seed, id string) (d time.Duration, why string, err error) {
	if err := b.freshFrom(ctx, seed); err != nil {
		return 0, "", err
	}
	b.dirty = true
	if err := b.checkpoint(ctx); err != nil {
		return 0, "", err
	}
	if ir := b.shadowctl(ctx, id+"-init", "init"); !ir.ok() {
		return 0, ir.reason(), nil
	}
	sr := b.shadowctlWithin(ctx, 30*time.Minute, id+"-start", b.startArgs(mode, id)...)
	if ctx.Err() != nil {
		return 0, "", ctx.Err()
	}
	if !sr.ok() {
		return 0, sr.reason(), nil
	}
	if ar := b.shadowctl(ctx, id+"-abort", "abort", id); !ar.ok() {
		return 0, "abort: " + strings.TrimSpace(ar.reason()), nil
	}
	return sr.dur, "", nil
}

// startArgs is the `shadowctl start` of every measured run.
func (b *bench) startArgs(mode, id string) []string {
	args := []string{"start", "--table", "public.orders", "--alter", alterSpec, "--sync", mode, "--until", "ready", "--name", id}
	return append(args, b.cfg.StartArgs...)
}
