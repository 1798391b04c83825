package integration

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/internal/daemon"
	"github.com/shadowctl/shadowctl/shadow"
)

// fakeClock is a clock the test moves by hand.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
}

// Issue 5, done-when 3: a scheduled window with an injected clock: no swap
// before it; inside it a blocker that outlasts the window makes the attempt
// give up at the window's end, and the daemon waits for the next window
// (not retrying in the same one), where the swap happens.
func TestDaemonCutoverWindow(t *testing.T) {
	db := newTestDB(t)
	db.createOrders(2000)
	ctx := context.Background()
	m, err := db.Runner.Submit(ctx, shadow.Request{Table: "orders", Alter: "ALTER COLUMN amount TYPE numeric(12,2)",
		CutoverPolicy: shadow.CutoverWindow, Window: "02:00-02:30 UTC", LockTimeout: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	day := time.Date(2026, 3, 10, 0, 0, 0, 0, time.UTC)
	clock := &fakeClock{now: day.Add(time.Hour)} // 01:00, before the window
	d := db.startDaemon(daemon.Config{Clock: clock})
	db.waitPhase(m.ID, shadow.Ready, 60*time.Second)
	st := shadow.StatusOf(db.migration(m.ID), clock.Now())
	if st.NextWindow == nil || !st.NextWindow.Start.Equal(day.Add(2*time.Hour)) || st.NextWindow.Open {
		t.Fatalf("status next_window %+v, want 02:00 today, not open", st.NextWindow)
	}

	// Before the window: nothing happens, however often the daemon looks.
	d.waitScans(t, 5)
	if p := db.migration(m.ID).Phase; p != shadow.Ready || len(db.events(m.ID, "cutover_attempt")) != 0 {
		t.Fatalf("before the window: phase %s, %d cutover attempts", p, len(db.events(m.ID, "cutover_attempt")))
	}

	// A long transaction on the table blocks the swap's lock.
	blocker, err := db.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer blocker.Rollback(ctx)
	if _, err := blocker.Exec(ctx, `SELECT count(*) FROM public.orders`); err != nil {
		t.Fatal(err)
	}
	// Inside the window, 1.5 s before its end: the attempt gives up at the end.
	inside := day.Add(2*time.Hour + 30*time.Minute - 1500*time.Millisecond)
	clock.set(inside)
	d.Wake()
	waitTrue(t, 30*time.Second, "the attempt inside the window to give up", func() bool { return len(db.events(m.ID, "cutover_failed")) == 1 })
	if p := db.migration(m.ID).Phase; p != shadow.Ready {
		t.Fatalf("after the window closed on the blocker: phase %s, want ready", p)
	}
	if n := len(db.events(m.ID, "swap_attempt")); n == 0 {
		t.Fatal("no lock attempts recorded while the blocker held the table")
	}
	if kind := scalar[string](db, `SELECT relkind::text FROM pg_class WHERE oid = 'public.orders'::regclass`); kind != "r" {
		t.Fatalf("public.orders relkind %s after the failed attempt, want r (blue still serves)", kind)
	}
	// Still the same window by the clock: no second attempt in it.
	d.waitScans(t, 5)
	if n := len(db.events(m.ID, "cutover_attempt")); n != 1 {
		t.Fatalf("%d attempts in one window, want 1", n)
	}
	// The window is over; the blocker goes; still nothing until the next one.
	clock.set(day.Add(3 * time.Hour))
	if err := blocker.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	d.waitScans(t, 5)
	if p := db.migration(m.ID).Phase; p != shadow.Ready || len(db.events(m.ID, "cutover_attempt")) != 1 {
		t.Fatalf("between windows: phase %s, %d attempts", p, len(db.events(m.ID, "cutover_attempt")))
	}
	// The next day's window: the swap happens.
	clock.set(day.Add(24*time.Hour + 2*time.Hour + 10*time.Second))
	d.Wake()
	db.waitPhase(m.ID, shadow.CutOver, 30*time.Second)
	if n := len(db.events(m.ID, "cutover_attempt")); n != 2 {
		t.Fatalf("%d cutover attempts, want 2 (one per window)", n)
	}
}
