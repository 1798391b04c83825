package shadow

import "testing"

// Trigger sync's copy steps back further than logical sync's by default: its
// sync already costs the application a write in every transaction. An
// operator's own share is kept.
func TestLoadShareDefaultsBySyncMode(t *testing.T) {
	for _, c := range []struct {
		sync  SyncMode
		share float64
		want  float64
	}{
		{"", 0, 0.2},
		{SyncTrigger, 0, 0.2},
		{SyncLogical, 0, 0.33},
		{SyncTrigger, 0.5, 0.5},
		{SyncLogical, 1, 1},
	} {
		r := Request{Table: "orders", Alter: "ADD COLUMN x int", Sync: c.sync, LoadShare: c.share}
		if err := r.Normalize(); err != nil {
			t.Fatal(err)
		}
		if r.LoadShare != c.want {
			t.Errorf("sync %q, --load-share %g: %g, want %g", c.sync, c.share, r.LoadShare, c.want)
		}
	}
}
