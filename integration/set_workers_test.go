package integration

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/backfill"
	"github.com/shadowctl/shadowctl/shadow"
)

// `shadowctl set workers=N` applies to a running copy: raised, more workers
// copy at once; lowered, the workers over the new count stop after their
// current batch and hand their ranges back, which the others finish. No row
// is lost or copied twice on the way.
//
// The copy starts with one worker (four ranges). The test's failpoint runs
// inside each batch: it holds batches until three ranges are being copied at
// once after the raise, and sets workers=1 while it holds them, so every
// batch after their release must be the only one running (each waits 300 ms
// for another to show up).
func TestSetWorkersAppliesToARunningCopy(t *testing.T) {
	db := newTestDB(t)
	const rows = 40000
	db.createOrders(rows)
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)",
		Workers: 1, BatchSize: 500})
	if err != nil {
		t.Fatal(err)
	}

	const (
		alone    = iota // one worker: no batch may meet another
		raised          // workers=3 set: hold batches until three ranges copy at once
		lowering        // three held: workers=1 being set
		lowered         // workers=1 set while three were held: alone again
		free
	)
	var (
		mu        sync.Mutex
		phase     = alone
		batches   int
		loweredAt int
		inFlight  = map[int]int{} // range → its batches inside the failpoint
		changed   = make(chan struct{})
		stored    = make(chan struct{}) // closed once workers=1 is stored
		problems  []string
	)
	// The helpers below are called with mu held, and return with it held.
	wake := func() { close(changed); changed = make(chan struct{}) }
	// waitRanges waits up to d for n ranges to be inside the failpoint at once.
	waitRanges := func(n int, d time.Duration) bool {
		deadline := time.NewTimer(d)
		defer deadline.Stop()
		for len(inFlight) < n {
			ch := changed
			mu.Unlock()
			select {
			case <-ch:
				mu.Lock()
			case <-deadline.C:
				mu.Lock()
				return false
			}
		}
		return true
	}
	set := func(n int) {
		mu.Unlock()
		defer mu.Lock()
		if err := db.Runner.Store.Set(ctx, m.ID, "test", map[string]int{"workers": n}); err != nil {
			t.Errorf("set workers=%d: %v", n, err)
		}
	}
	db.Runner.Failpoints.CopyBatch = func(ctx context.Context, r backfill.Range) error {
		mu.Lock()
		inFlight[r.No]++
		batches++
		wake()
		defer func() {
			if inFlight[r.No]--; inFlight[r.No] == 0 {
				delete(inFlight, r.No)
			}
			wake()
			mu.Unlock()
		}()
		switch phase {
		case alone, lowered:
			if waitRanges(2, 300*time.Millisecond) {
				problems = append(problems, fmt.Sprintf("phase %d, batch %d: ranges %v copied at once", phase, batches, rangesOf(inFlight)))
			}
			switch {
			case phase == alone && batches >= 3:
				phase = raised
				set(3)
			case phase == lowered && batches >= loweredAt+4:
				phase = free
			}
		case raised, lowering:
			if !waitRanges(3, 30*time.Second) {
				problems = append(problems, "after workers=3, three ranges never copied at once")
				phase = free
				return nil
			}
			if phase == raised {
				// All three are held here: workers=1 is stored before
				// any of them commits and reaches its next batch's gate.
				phase = lowering
				set(1)
				phase, loweredAt = lowered, batches
				close(stored)
				return nil
			}
			ch := stored
			mu.Unlock()
			<-ch
			mu.Lock()
		}
		return nil
	}
	if _, err := db.Runner.Drive(ctx, m.ID, shadow.Ready); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if phase != free || len(problems) > 0 {
		t.Fatalf("ended in phase %d after %d batches; problems: %v", phase, batches, problems)
	}
	if got := db.rowsCopied(m.ID); got != rows {
		t.Fatalf("%d rows counted by the checkpoints, want %d", got, rows)
	}
	db.assertGreenMatches(`SELECT id, amount::numeric(12,2) FROM public.orders`, `SELECT id, amount FROM green.orders`)
}

func rangesOf(m map[int]int) []int {
	out := make([]int, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
