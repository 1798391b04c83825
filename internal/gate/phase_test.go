package gate

import "testing"

func TestEvaluate(t *testing.T) {
	cases := []struct {
		current, want string
		v             Verdict
	}{
		{"copying", "ready", NotYet},
		{"ready", "ready", Reached},
		{"cut_over", "ready", Reached},
		{"finalized", "cut_over", Reached},
		{"cutting_over", "cut_over", NotYet},
		{"rolled_back", "ready", Reached},
		{"rolled_back", "cut_over", NotYet},
		{"rolling_back", "rolling_back", Reached},
		{"rolled_back", "rolling_back", Reached},
		{"cut_over", "rolled_back", NotYet},
		{"failed", "pending", Failed},
		{"aborting", "ready", Failed},
		{"aborted", "ready", Failed},
	}
	for _, c := range cases {
		if got := Evaluate(c.current, c.want); got != c.v {
			t.Errorf("Evaluate(%s, %s) = %v, want %v", c.current, c.want, got, c.v)
		}
	}
	for _, bad := range []string{"failed", "aborted", "bogus", ""} {
		if ValidatePhase(bad) == nil {
			t.Errorf("ValidatePhase(%q) accepted", bad)
		}
	}
}

func TestSplitName(t *testing.T) {
	cases := map[string][]string{
		`Orders.Email`:       {"orders", "email"},
		`"My Table"."Col.x"`: {"My Table", "Col.x"},
		`s.t.c`:              {"s", "t", "c"},
		`"a""b".c`:           {`a"b`, "c"},
	}
	for in, want := range cases {
		got, err := splitName(in)
		if err != nil || len(got) != len(want) {
			t.Fatalf("%q: %q %v", in, got, err)
		}
		for i := range want {
			if got[i] != want[i] {
				t.Errorf("%q: %q, want %q", in, got, want)
			}
		}
	}
	for _, bad := range []string{"", ".a", `"a`, "a."} {
		if _, err := splitName(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}
