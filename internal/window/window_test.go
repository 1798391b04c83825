package window

import (
	"errors"
	"testing"
	"time"
)

func TestParseAndNext(t *testing.T) {
	berlin, _ := time.LoadLocation("Europe/Berlin")
	cases := []struct {
		spec  string
		now   time.Time
		start time.Time
		end   time.Time
		open  bool
	}{
		{"Sat,Sun 02:00-04:00 Europe/Berlin", time.Date(2026, 11, 27, 12, 0, 0, 0, berlin), // Friday
			time.Date(2026, 11, 28, 2, 0, 0, 0, berlin), time.Date(2026, 11, 28, 4, 0, 0, 0, berlin), false},
		{"Sat,Sun 02:00-04:00 Europe/Berlin", time.Date(2026, 11, 29, 3, 0, 0, 0, berlin), // Sunday, inside
			time.Date(2026, 11, 29, 2, 0, 0, 0, berlin), time.Date(2026, 11, 29, 4, 0, 0, 0, berlin), true},
		{"Sat,Sun 02:00-04:00 Europe/Berlin", time.Date(2026, 11, 29, 4, 0, 0, 0, berlin), // Sunday, end: next Saturday
			time.Date(2026, 12, 5, 2, 0, 0, 0, berlin), time.Date(2026, 12, 5, 4, 0, 0, 0, berlin), false},
		{"23:00-01:00", time.Date(2026, 1, 2, 0, 30, 0, 0, time.UTC), // crosses midnight, open from yesterday
			time.Date(2026, 1, 1, 23, 0, 0, 0, time.UTC), time.Date(2026, 1, 2, 1, 0, 0, 0, time.UTC), true},
		{"fri 23:00-01:00 UTC", time.Date(2026, 11, 28, 0, 59, 0, 0, time.UTC), // Saturday 00:59, Friday's window
			time.Date(2026, 11, 27, 23, 0, 0, 0, time.UTC), time.Date(2026, 11, 28, 1, 0, 0, 0, time.UTC), true},
		{"Mon-Wed 10:00-11:00", time.Date(2026, 11, 26, 10, 30, 0, 0, time.UTC), // Thursday: next Monday
			time.Date(2026, 11, 30, 10, 0, 0, 0, time.UTC), time.Date(2026, 11, 30, 11, 0, 0, 0, time.UTC), false},
	}
	for _, c := range cases {
		w, err := Parse(c.spec)
		if err != nil {
			t.Fatalf("%s: %v", c.spec, err)
		}
		s, e, open := w.Next(c.now)
		if !s.Equal(c.start) || !e.Equal(c.end) || open != c.open {
			t.Errorf("%s at %s: got %s–%s open=%v, want %s–%s open=%v", c.spec, c.now, s, e, open, c.start, c.end, c.open)
		}
	}
}

func TestParseErrors(t *testing.T) {
	for _, spec := range []string{"", "Sat", "Foo 02:00-03:00", "02:00", "25:00-26:00", "02:00-03:00 Mars/Olympus", "02:00-03:00 UTC extra", "2:0-3:00"} {
		if _, err := Parse(spec); !errors.Is(err, ErrBadWindow) {
			t.Errorf("%q: got %v, want ErrBadWindow", spec, err)
		}
	}
}
