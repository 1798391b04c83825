package integration

import (
	"context"
	"testing"
	"time"

	"github.com/shadowctl/shadowctl/internal/pace"
)

// The copy's pace follows the application: quiet while no other session runs
// a statement, busy (one worker on the duty cycle) while two application
// sessions are running one (here: waiting for an advisory lock, which
// pg_stat_activity shows as active), quiet again once they are done. The
// sessions of shadowctl itself (its application_name) never count.
func TestPaceFollowsApplicationActivity(t *testing.T) {
	db := newTestDB(t)
	ctx := context.Background()
	own := db.Pool.Config().ConnConfig.RuntimeParams["application_name"]
	gauge := pace.AppLoad(db.Pool, own, 2, 0.25)

	waitPace := func(what string, want bool) pace.Pace {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			p := gauge(ctx)
			if p.Busy == want {
				return p
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: pace still %+v after 20 s", what, p)
			}
			// The gauge samples at most every 250 ms; asking again sooner
			// returns the same answer.
			time.Sleep(50 * time.Millisecond)
		}
	}
	if p := gauge(ctx); p.Busy || p.Workers != 2 || p.Duty != 1 {
		t.Fatalf("idle database: pace %+v, want both workers at full duty", p)
	}

	holder, a, b := newSession(t, db), newSession(t, db), newSession(t, db)
	holder.run(`SELECT pg_advisory_lock(4242)`)
	a.start(`SELECT pg_advisory_lock_shared(4242)`)
	b.start(`SELECT pg_advisory_lock_shared(4242)`)
	p := waitPace("two application sessions active", true)
	if p.Workers != 1 || p.Duty != 0.25 {
		t.Fatalf("busy application: pace %+v, want one worker at duty 0.25", p)
	}
	if rest := p.Rest(100 * time.Millisecond); rest != 300*time.Millisecond {
		t.Fatalf("rest after a 100 ms batch at duty 0.25 = %s, want 300ms", rest)
	}

	// Both wait in shared mode: released together, whatever their order.
	holder.run(`SELECT pg_advisory_unlock(4242)`)
	a.wait("the first waiter")
	b.wait("the second waiter")
	waitPace("application quiet again", false)

	// A session in the middle of a transaction counts too: a client
	// starved of CPU between two statements is still the application at
	// work.
	c := newSession(t, db)
	c.run(`BEGIN`)
	c.run(`SELECT 1`)
	waitPace("an application session idle in a transaction", true)
	c.run(`COMMIT`)
	waitPace("application quiet after the commit", false)
}
