"""The TDX-module model (kvmmmu/tdx_module.py): SEAMCALL throughput.

These benchmarks depend only on kvmmmu.tdx_module (pure Python).

* ``TdxCycle.time_aug_block_track_remove``: ``CYCLES`` private-page
  life cycles as KVM drives them on a RUNNABLE TD with one vCPU in guest
  mode: PAGE.AUG, then (``remove_external_spte``) RANGE.BLOCK, TRACK, the
  vCPU kicked out and back in, PAGE.REMOVE, PHYMEM.PAGE.WBINVD.  Divide
  ``CYCLES`` by the time for cycles per second.
* ``TdxCycle.time_aug_only``: ``CYCLES`` PAGE.AUGs into an empty 4K table
  (the fault path's leaf hook).
* ``TdxCycle.time_audit``: one :meth:`TdxModule.audit` of a TD with 512
  mapped pages.

``setup`` builds a fresh TD with its S-EPT tables, so the timed body is only
the SEAMCALLs; ``number = 1`` so asv re-runs ``setup`` before each sample.
"""
from kvmmmu.tdx_module import TdxModule

CYCLES = 512
TDR, HKID, VCPU = 0x100, 7, 0x101
GPA = 0x40000000            # a 2M-aligned private GPA: one 4K table holds 512 pages
PAGE0 = 0x100000


def _td(finalize=True):
    m = TdxModule()
    _, td = m.tdh_mng_create(TDR, HKID)
    m.tdh_vp_create(td, VCPU)
    for lv, pfn in ((3, 0x200), (2, 0x201), (1, 0x202)):
        s = 12 + 9 * lv
        m.tdh_mem_sept_add(td, GPA >> s << s, lv, pfn)
    if finalize:
        m.tdh_mr_finalize(td)
        m.tdh_vp_enter(td, VCPU)
    return m, td


class TdxCycle:
    number = 1
    repeat = 10

    def setup(self):
        self.m, self.td = _td()

    def time_aug_block_track_remove(self):
        m, td = self.m, self.td
        for i in range(CYCLES):
            gpa = GPA + (i << 12)
            pfn = PAGE0 + i
            m.tdh_mem_page_aug(td, gpa, 0, pfn)
            m.tdh_mem_range_block(td, gpa, 0)
            m.tdh_mem_track(td)
            m.td_exit(td, VCPU)
            m.tdh_vp_enter(td, VCPU)
            m.tdh_mem_page_remove(td, gpa, 0)
            m.tdh_phymem_page_wbinvd_hkid(HKID, pfn)

    def time_aug_only(self):
        m, td = self.m, self.td
        for i in range(CYCLES):
            m.tdh_mem_page_aug(td, GPA + (i << 12), 0, PAGE0 + i)


class TdxAudit:
    number = 1
    repeat = 10

    def setup(self):
        self.m, td = _td()
        for i in range(512):
            self.m.tdh_mem_page_aug(td, GPA + (i << 12), 0, PAGE0 + i)

    def time_audit(self):
        self.m.audit()
