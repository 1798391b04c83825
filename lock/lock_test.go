package lock

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// The derivation is an interface other tools compute: these values must never
// change.
func TestKeyForIsStable(t *testing.T) {
	for name, want := range map[string]int64{
		"migrations": 3731541570333168407, // 0x33c91949a44fd317
		"":           -7330916446951345186,
		"orders":     5406318166226018672,
	} {
		if got := KeyFor(name); got != want {
			t.Errorf("KeyFor(%q) = %d, want %d", name, got, want)
		}
	}
}

func TestSplitMatchesPgLocks(t *testing.T) {
	classid, objid := split(-1)
	if classid != 0xffffffff || objid != 0xffffffff {
		t.Fatalf("split(-1) = %d, %d", classid, objid)
	}
	classid, objid = split(0x0000000100000002)
	if classid != 1 || objid != 2 {
		t.Fatalf("split = %d, %d", classid, objid)
	}
}

func TestHeldErrorNamesHolders(t *testing.T) {
	since := time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)
	err := error(&HeldError{Name: "migrations", Key: 42, Waited: 1500 * time.Millisecond, Holders: []Holder{{
		PID: 123, User: "app", ApplicationName: "flyway", ClientAddr: "10.0.0.1",
		BackendStart: since, Since: since,
	}}})
	if !errors.Is(err, ErrHeld) {
		t.Fatal("HeldError is not ErrHeld")
	}
	msg := err.Error()
	for _, want := range []string{`"migrations"`, "pid 123", `application "flyway"`, "client 10.0.0.1", "user app", "connected since 2024-05-01T12:00:00Z", "waited 1.5s"} {
		if !strings.Contains(msg, want) {
			t.Errorf("message %q lacks %q", msg, want)
		}
	}
	empty := (&HeldError{Name: "x"}).Error()
	if !strings.Contains(empty, "gone before it could be identified") {
		t.Errorf("no-holder message: %q", empty)
	}
}

func TestTruncateKeepsRunes(t *testing.T) {
	if got := truncate("shadowctl lock é", 16); got != "shadowctl lock " {
		t.Fatalf("truncate = %q", got)
	}
	if got := truncate("abc", 63); got != "abc" {
		t.Fatalf("truncate = %q", got)
	}
}
