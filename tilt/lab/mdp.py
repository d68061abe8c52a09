"""The exact lab of demonstration-regularised RL (Tiapkin et al. 2023, arXiv 2310.17303; digest §3).

A random finite-horizon tabular MDP, an epsilon-optimal expert, behaviour cloning (BC) with add-one smoothing
from N expert trajectories, and exact KL-regularised planning toward the clone by soft value iteration:

    V_lam(pi) = E_pi[ sum_h r_h(s_h, a_h) - lam * KL(pi_h(s_h) || pi_BC_h(s_h)) ]
    Q_h(s, a) = r_h(s, a) + sum_s' p_h(s'|s, a) V_{h+1}(s')
    V_h(s)    = lam * log sum_a pi_BC_h(a|s) exp(Q_h(s, a) / lam)
    pi_h(a|s) ∝ pi_BC_h(a|s) exp(Q_h(s, a) / lam)

(digest §3(a); the soft Bellman recursion is [D], the paper's use of it [R, high confidence]). Every value,
occupancy and trajectory KL is computed exactly by dynamic programming; only the demonstrations and the
preferences are sampled. What the experiments check [D]:

    V* - V^{pi*_lam} <= eps_E + lam * KL_traj(pi_E || pi_BC)

The RLHF variant (digest §3(a) step 3; the data protocol is [R]): pairs of trajectories drawn from the clone,
a preference drawn from Bradley–Terry on their true returns, a tabular reward fitted by maximum likelihood
(logistic regression on the difference of (h, s, a) visit counts, l2-regularised), then regularised planning
toward the clone with the fitted reward.

Conventions: the MDP starts in state 0; tensors are float64; a policy is (H, S, A), rows summing to 1;
values are (H + 1, S) with V_{H} = 0. The paper's solvers (UCBVI-Ent+, online exploration) are replaced by
exact planning in the true MDP: the lab checks the statistical claims, not the exploration.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tilt.math.preference import bradley_terry_loss, win_probability

def derive_seed(seed: int, *labels) -> int:
    """A 63-bit seed from a base seed and labels, stable across processes (the lab imports no recipe)."""
    text = ":".join(str(p) for p in (seed, *labels)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


EXPERT_TEMPERATURE = 0.05
"""The expert is softmax(Q*/0.05), as in digest §3(e); on the default MDP it is 0.035-optimal."""

PREFERENCE_L2 = 1e-3
"""Ridge coefficient of the tabular reward MLE, l2 = 1e-3 as in digest §3(e) E2.3, added to the *mean*
negative log-likelihood over the preferences (the digest does not say which; on the summed likelihood the
fitted rewards of rarely seen (h, s, a) grow to tens, and no lam below 1 helps until P is in the thousands)."""


@dataclass(frozen=True)
class TabularMDP:
    """A finite-horizon episodic MDP with stage-dependent transitions and rewards, started in state 0."""

    transitions: Tensor  # (H, S, A, S) p_h(s' | s, a)
    rewards: Tensor  # (H, S, A) r_h(s, a) in [0, 1]

    @property
    def horizon(self) -> int:
        return self.rewards.shape[0]

    @property
    def states(self) -> int:
        return self.rewards.shape[1]

    @property
    def actions(self) -> int:
        return self.rewards.shape[2]


def random_mdp(states: int, actions: int, horizon: int, *, seed: int, concentration: float = 0.5) -> TabularMDP:
    """Transitions Dirichlet(concentration) per (h, s, a), rewards U[0, 1] per (h, s, a) (digest §3(e))."""
    if states < 1 or actions < 2 or horizon < 1:
        raise ValueError(f"need states >= 1, actions >= 2, horizon >= 1; got {states}, {actions}, {horizon}")
    g = torch.Generator().manual_seed(derive_seed(seed, "mdp"))
    alpha = torch.full((horizon, states, actions, states), concentration, dtype=torch.float64)
    gammas = _gamma(alpha, g)
    transitions = gammas / gammas.sum(-1, keepdim=True)
    rewards = torch.rand(horizon, states, actions, generator=g, dtype=torch.float64)
    return TabularMDP(transitions, rewards)


def _gamma(alpha: Tensor, g: torch.Generator) -> Tensor:
    """Gamma(alpha, 1) draws with a generator (Marsaglia–Tsang, boosted for alpha < 1), so the MDP is a pure
    function of the seed."""
    a = alpha + 1.0  # draw Gamma(alpha + 1), then multiply by U^(1/alpha)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.zeros_like(alpha)
    todo = torch.ones_like(alpha, dtype=torch.bool)
    while todo.any():
        x = torch.randn(alpha.shape, generator=g, dtype=alpha.dtype)
        u = torch.rand(alpha.shape, generator=g, dtype=alpha.dtype)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x**2 + d - d * v + d * torch.log(v.clamp(min=1e-300)))
        take = todo & ok
        out = torch.where(take, d * v, out)
        todo = todo & ~ok
    u = torch.rand(alpha.shape, generator=g, dtype=alpha.dtype)
    return out * u ** (1.0 / alpha)


# --- exact dynamic programming ------------------------------------------------------------------------------


def q_from_values(mdp: TabularMDP, rewards: Tensor, next_values: Tensor, h: int) -> Tensor:
    """Q_h(s, a) = r_h(s, a) + sum_s' p_h(s'|s, a) V_{h+1}(s'). next_values: (S,). Returns (S, A)."""
    return rewards[h] + mdp.transitions[h] @ next_values


def optimal_values(mdp: TabularMDP, rewards: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Unregularised value iteration. Returns (Q* (H, S, A), V* (H + 1, S))."""
    rewards = mdp.rewards if rewards is None else rewards
    H, S, A = rewards.shape
    q = torch.zeros(H, S, A, dtype=torch.float64)
    v = torch.zeros(H + 1, S, dtype=torch.float64)
    for h in reversed(range(H)):
        q[h] = q_from_values(mdp, rewards, v[h + 1], h)
        v[h] = q[h].amax(-1)
    return q, v


def soft_value_iteration(mdp: TabularMDP, prior: Tensor, lam: float, rewards: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The maximiser of E_pi[sum_h r_h - lam KL(pi_h || prior_h)] and its regularised values (module docstring).

    prior: (H, S, A) with full support; lam >= 0. lam = 0 is greedy planning on ``rewards``, with ties split in
    proportion to the prior (the lam -> 0 limit). Returns (policy (H, S, A), regularised values (H + 1, S)).
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    rewards = mdp.rewards if rewards is None else rewards
    H, S, A = rewards.shape
    log_prior = prior.log()
    policy = torch.zeros(H, S, A, dtype=torch.float64)
    v = torch.zeros(H + 1, S, dtype=torch.float64)
    for h in reversed(range(H)):
        q = q_from_values(mdp, rewards, v[h + 1], h)  # (S, A)
        if lam == 0:
            best = q >= q.amax(-1, keepdim=True) - 1e-12
            w = torch.where(best, prior[h], 0.0)
            policy[h] = w / w.sum(-1, keepdim=True)
            v[h] = q.amax(-1)
        else:
            logits = log_prior[h] + q / lam  # (S, A)
            v[h] = lam * torch.logsumexp(logits, -1)
            policy[h] = torch.softmax(logits, -1)
    return policy, v


def policy_values(mdp: TabularMDP, policy: Tensor, rewards: Tensor | None = None) -> Tensor:
    """V^pi_h(s) = sum_a pi_h(a|s) Q^pi_h(s, a), exactly. Returns (H + 1, S)."""
    rewards = mdp.rewards if rewards is None else rewards
    H, S, _ = rewards.shape
    v = torch.zeros(H + 1, S, dtype=torch.float64)
    for h in reversed(range(H)):
        v[h] = (policy[h] * q_from_values(mdp, rewards, v[h + 1], h)).sum(-1)
    return v


def state_occupancy(mdp: TabularMDP, policy: Tensor) -> Tensor:
    """d^pi_h(s) = P_pi(s_h = s), started in state 0. Returns (H, S), each row summing to 1."""
    H, S = mdp.horizon, mdp.states
    d = torch.zeros(H, S, dtype=torch.float64)
    d[0, 0] = 1.0
    for h in range(H - 1):
        d[h + 1] = torch.einsum("s,sa,sat->t", d[h], policy[h], mdp.transitions[h])
    return d


def trajectory_kl(mdp: TabularMDP, p: Tensor, q: Tensor) -> float:
    """KL_traj(p || q) = E_p[ sum_h KL(p_h(s_h) || q_h(s_h)) ], the KL between the trajectory laws (digest §3(a))."""
    d = state_occupancy(mdp, p)  # (H, S)
    per_state = torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(-1)  # (H, S)
    return float((d * per_state).sum())


def softmax_expert(mdp: TabularMDP, temperature: float = EXPERT_TEMPERATURE) -> Tensor:
    """pi_E_h(a|s) ∝ exp(Q*_h(s, a) / temperature): an expert that is eps_E-optimal, eps_E -> 0 with the temperature."""
    q, _ = optimal_values(mdp)
    return torch.softmax(q / temperature, -1)


# --- sampling, cloning, preferences -------------------------------------------------------------------------


def sample_trajectories(mdp: TabularMDP, policy: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n trajectories of ``policy`` from state 0. Returns (states (n, H), actions (n, H)), long."""
    H = mdp.horizon
    states = torch.zeros(n, H, dtype=torch.long)
    actions = torch.zeros(n, H, dtype=torch.long)
    s = torch.zeros(n, dtype=torch.long)
    for h in range(H):
        states[:, h] = s
        a = torch.multinomial(policy[h, s], 1, generator=generator).squeeze(-1)
        actions[:, h] = a
        if h + 1 < H:
            s = torch.multinomial(mdp.transitions[h, s, a], 1, generator=generator).squeeze(-1)
    return states, actions


def visit_counts(states: Tensor, actions: Tensor, num_states: int, num_actions: int) -> Tensor:
    """N_h(s, a), the visits summed over the trajectories given. states, actions: (n, H). Returns (H, S, A) float64."""
    n, H = states.shape
    flat = (torch.arange(H) * num_states + states) * num_actions + actions  # (n, H) index of (h, s, a)
    counts = torch.zeros(H * num_states * num_actions, dtype=torch.float64)
    counts.index_add_(0, flat.reshape(-1), torch.ones(flat.numel(), dtype=torch.float64))
    return counts.view(H, num_states, num_actions)


def trajectory_features(states: Tensor, actions: Tensor, num_states: int, num_actions: int) -> Tensor:
    """One-hot (h, s, a) visits of each trajectory: (n, H*S*A), so that features @ r.flatten() is the return."""
    n, H = states.shape
    flat = (torch.arange(H) * num_states + states) * num_actions + actions  # (n, H)
    feats = torch.zeros(n, H * num_states * num_actions, dtype=torch.float64)
    feats.scatter_add_(1, flat, torch.ones(n, H, dtype=torch.float64))
    return feats


def behaviour_clone(counts: Tensor, pseudo_count: float = 1.0) -> Tensor:
    """pi_BC_h(a|s) = (N_h(s, a) + c) / (N_h(s) + A c): the closed-form maximiser of the log-likelihood plus the
    paper's logarithmic regulariser c * sum_{h,s,a} log pi_h(a|s) (digest §3(a); c = 1 is add-one smoothing).
    counts: (H, S, A). Returns (H, S, A). Unvisited states get the uniform policy."""
    if pseudo_count <= 0:
        raise ValueError(f"pseudo_count must be > 0 so that every action keeps positive probability, got {pseudo_count}")
    smoothed = counts + pseudo_count
    return smoothed / smoothed.sum(-1, keepdim=True)


PREFERENCE_CHUNK = 50
"""Preference pairs are drawn in chunks of this many, each chunk with its own generator, so that the first P
pairs of a replicate are the same whatever the largest P asked for (the preference sets are nested)."""


def sample_preferences(mdp: TabularMDP, policy: Tensor, n_pairs: int, *, seed: int, replicate: int) -> tuple[Tensor, Tensor]:
    """n_pairs pairs (tau0, tau1) of ``policy`` trajectories, labelled by Bradley–Terry on their true returns,
    P(o = 1) = sigmoid(R(tau1) - R(tau0)) (digest §3(a), Assumption 4 [R]).

    Returns (feature_diff (n, H*S*A) = phi(tau1) - phi(tau0), outcomes (n,) float, 1 where tau1 won). The pairs
    are a pure function of (seed, replicate, index), so a longer draw extends a shorter one.
    """
    S, A = mdp.states, mdp.actions
    diffs, outcomes = [], []
    for chunk, start in enumerate(range(0, n_pairs, PREFERENCE_CHUNK)):
        n = min(PREFERENCE_CHUNK, n_pairs - start)
        g = torch.Generator().manual_seed(derive_seed(seed, "preferences", replicate, chunk))
        s0, a0 = sample_trajectories(mdp, policy, PREFERENCE_CHUNK, g)
        s1, a1 = sample_trajectories(mdp, policy, PREFERENCE_CHUNK, g)
        phi0, phi1 = trajectory_features(s0, a0, S, A), trajectory_features(s1, a1, S, A)  # (chunk, HSA)
        returns = mdp.rewards.reshape(-1)  # R(tau) = phi(tau) @ returns
        p_won = win_probability(phi1 @ returns, phi0 @ returns, scale=1.0)  # P(tau1 preferred)
        diff = phi1 - phi0
        won = torch.rand(PREFERENCE_CHUNK, generator=g, dtype=torch.float64) < p_won
        diffs.append(diff[:n])
        outcomes.append(won[:n].to(torch.float64))
    if not diffs:
        return torch.zeros(0, mdp.horizon * S * A, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    return torch.cat(diffs), torch.cat(outcomes)


def fit_tabular_reward(feature_diff: Tensor, outcomes: Tensor, *, l2: float = PREFERENCE_L2, iters: int = 100) -> Tensor:
    """The maximum-likelihood tabular reward: argmin_r (1/n) sum_k BT-NLL(r(tau1_k) - r(tau0_k); o_k) + l2/2 ||r||^2.

    Logistic regression on count differences, solved by damped Newton (the objective is strictly convex for
    l2 > 0). feature_diff: (n, D); outcomes: (n,) in {0, 1}. Returns r (D,). Features that never differ within
    a pair get 0 (the ridge's choice), and rarely seen ones get values fitted to a handful of labels; greedy
    planning on r heads for them (reward hacking), which the KL term toward the clone prevents.
    """
    if l2 <= 0:
        raise ValueError(f"l2 must be > 0 (the MLE does not exist on separable preferences otherwise), got {l2}")
    n, dim = feature_diff.shape
    r = torch.zeros(dim, dtype=torch.float64)
    if n == 0:
        return r
    sign = 2.0 * outcomes - 1.0  # +1 where tau1 won
    zeros = torch.zeros(n, dtype=torch.float64)

    def objective(w: Tensor) -> Tensor:
        # chosen-minus-rejected return difference against 0: the likelihood depends on the difference only.
        return bradley_terry_loss(sign * (feature_diff @ w), zeros).mean() + 0.5 * l2 * w.dot(w)

    value = objective(r)
    for _ in range(iters):
        z = sign * (feature_diff @ r)
        p = torch.sigmoid(-z)  # d/dz of -log sigmoid(z) is -sigmoid(-z)
        grad = -(feature_diff.T @ (sign * p)) / n + l2 * r
        hess = feature_diff.T @ (feature_diff * (p * (1 - p)).unsqueeze(-1)) / n + l2 * torch.eye(dim, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        decrement = float(grad.dot(step))
        if decrement < 1e-12:
            break
        t = 1.0
        while t > 1e-10:
            candidate = r - t * step
            new_value = objective(candidate)
            if new_value <= value - 0.25 * t * decrement:
                break
            t *= 0.5
        r, value = candidate, new_value
    return r


# --- the experiments ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """An MDP with its expert and the exact numbers every experiment reports."""

    mdp: TabularMDP
    expert: Tensor  # (H, S, A)
    v_star: float  # V*(s_1)
    epsilon_e: float  # V*(s_1) - V^{pi_E}(s_1)


def make_world(states: int, actions: int, horizon: int, *, seed: int, expert_temperature: float = EXPERT_TEMPERATURE) -> World:
    mdp = random_mdp(states, actions, horizon, seed=seed)
    expert = softmax_expert(mdp, expert_temperature)
    v_star = float(optimal_values(mdp)[1][0, 0])
    return World(mdp, expert, v_star, v_star - float(policy_values(mdp, expert)[0, 0]))


def clone_from_demos(world: World, n_demos: int, *, seed: int, replicate: int) -> Tensor:
    """The add-one clone from ``n_demos`` expert trajectories, drawn with a generator fixed by (seed, replicate)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "demos", replicate))
    states, actions = sample_trajectories(world.mdp, world.expert, n_demos, g)
    return behaviour_clone(visit_counts(states, actions, world.mdp.states, world.mdp.actions))


def gap(world: World, policy: Tensor) -> float:
    """V*(s_1) - V^pi(s_1) under the true reward."""
    return world.v_star - float(policy_values(world.mdp, policy)[0, 0])


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx = torch.tensor([math.log(x) for x in xs], dtype=torch.float64)
    ly = torch.tensor([math.log(y) for y in ys], dtype=torch.float64)
    lx = lx - lx.mean()
    return float((lx * (ly - ly.mean())).sum() / (lx * lx).sum())


def bc_rate(world: World, demos: list[int], *, seeds: int, seed: int) -> dict:
    """Mean KL_traj(pi_E || pi_BC) over ``seeds`` demonstration draws, per N, and the log-log slope (digest E2.1)."""
    if not demos or seeds < 1:
        raise ValueError("give at least one number of demonstrations and seeds >= 1")
    rows = []
    for n in demos:
        kls = [trajectory_kl(world.mdp, world.expert, clone_from_demos(world, n, seed=seed, replicate=i)) for i in range(seeds)]
        mean = sum(kls) / len(kls)
        rows.append({"demos": n, "kl_traj": mean, "n_times_kl": n * mean})
    slope = loglog_slope([r["demos"] for r in rows], [r["kl_traj"] for r in rows]) if len(rows) >= 2 else None
    return {"rows": rows, "slope": slope}


def demo_rl(world: World, n_demos: int, lam: float, *, seed: int, replicate: int = 0) -> dict:
    """Clone from N demonstrations, plan exactly toward the clone with coefficient lam, report the gaps (E2.2)."""
    clone = clone_from_demos(world, n_demos, seed=seed, replicate=replicate)
    policy, _ = soft_value_iteration(world.mdp, clone, lam)
    kl_traj = trajectory_kl(world.mdp, world.expert, clone)
    return {
        "gap": gap(world, policy),
        "bound": world.epsilon_e + lam * kl_traj,
        "bc_gap": gap(world, clone),
        "kl_traj": kl_traj,
        "kl_policy_clone": trajectory_kl(world.mdp, policy, clone),
    }


def demo_rlhf(world: World, n_demos: int, preferences: list[int], lams: list[float], *, seeds: int, seed: int) -> dict:
    """Clone, collect preferences on clone trajectory pairs, fit the MLE tabular reward, plan toward the clone
    (digest E2.3). The preference sets are nested: the first P pairs of one pool per replicate.
    Returns mean gaps per (P, lam) over ``seeds`` replicates, and the clone's mean gap."""
    mdp = world.mdp
    gaps = {(p, lam): 0.0 for p in preferences for lam in lams}
    bc_gap = 0.0
    for i in range(seeds):
        clone = clone_from_demos(world, n_demos, seed=seed, replicate=i)
        bc_gap += gap(world, clone) / seeds
        diff, outcomes = sample_preferences(mdp, clone, max(preferences), seed=seed, replicate=i)
        for p in preferences:
            r_hat = fit_tabular_reward(diff[:p], outcomes[:p]).view(mdp.horizon, mdp.states, mdp.actions)
            for lam in lams:
                policy, _ = soft_value_iteration(mdp, clone, lam, rewards=r_hat)
                gaps[(p, lam)] += gap(world, policy) / seeds
    rows = [{"preferences": p, "lam": lam, "gap": gaps[(p, lam)]} for p in preferences for lam in lams]
    return {"rows": rows, "bc_gap": bc_gap}
