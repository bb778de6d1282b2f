/* A PKCS#11 module that forwards every call to the module named by UNPLUG_MODULE, except while
 * the file named by UNPLUG_FLAG exists: then every call on a slot, session or object returns
 * CKR_DEVICE_REMOVED, as a token pulled out of its reader (or an HSM gone from the network)
 * answers. SoftHSM2 lives in the caller's process and cannot be stopped; this is its outage.
 * The token's state (sessions, logins, keys) survives, as a real device's would.
 *
 * Built by integration/common/softhsm.rs with `cc -shared`. Forwarding uses eight integer
 * arguments for every function: on x86-64 and aarch64 every PKCS#11 argument is an integer or a
 * pointer, and a callee ignores arguments it does not take. */
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef unsigned long rv_t;
typedef rv_t (*fn_t)(uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t, uintptr_t);

#define FUNCTIONS 68 /* PKCS#11 2.40: C_Initialize … C_WaitForSlotEvent */
#define FIRST_WRAPPED 4 /* C_Initialize, C_Finalize, C_GetInfo, C_GetFunctionList pass through */
#define CKR_DEVICE_REMOVED 0x32UL
#define CKR_GENERAL_ERROR 0x5UL

struct function_list {
    unsigned char version[2];
    fn_t f[FUNCTIONS];
};

static struct function_list *real;
static struct function_list ours;

static int unplugged(void) {
    const char *flag = getenv("UNPLUG_FLAG");
    return flag && access(flag, F_OK) == 0;
}

#define WRAP(n)                                                                                   \
    static rv_t w##n(uintptr_t a, uintptr_t b, uintptr_t c, uintptr_t d, uintptr_t e, uintptr_t f, \
                     uintptr_t g, uintptr_t h) {                                                  \
        if (unplugged()) return CKR_DEVICE_REMOVED;                                               \
        return real->f[n](a, b, c, d, e, f, g, h);                                                \
    }
WRAP(4) WRAP(5) WRAP(6) WRAP(7) WRAP(8) WRAP(9) WRAP(10) WRAP(11)
WRAP(12) WRAP(13) WRAP(14) WRAP(15) WRAP(16) WRAP(17) WRAP(18) WRAP(19)
WRAP(20) WRAP(21) WRAP(22) WRAP(23) WRAP(24) WRAP(25) WRAP(26) WRAP(27)
WRAP(28) WRAP(29) WRAP(30) WRAP(31) WRAP(32) WRAP(33) WRAP(34) WRAP(35)
WRAP(36) WRAP(37) WRAP(38) WRAP(39) WRAP(40) WRAP(41) WRAP(42) WRAP(43)
WRAP(44) WRAP(45) WRAP(46) WRAP(47) WRAP(48) WRAP(49) WRAP(50) WRAP(51)
WRAP(52) WRAP(53) WRAP(54) WRAP(55) WRAP(56) WRAP(57) WRAP(58) WRAP(59)
WRAP(60) WRAP(61) WRAP(62) WRAP(63) WRAP(64) WRAP(65) WRAP(66) WRAP(67)

static const fn_t wrappers[FUNCTIONS] = {
    0, 0, 0, 0,
    w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15, w16, w17, w18, w19, w20, w21, w22, w23,
    w24, w25, w26, w27, w28, w29, w30, w31, w32, w33, w34, w35, w36, w37, w38, w39, w40, w41, w42,
    w43, w44, w45, w46, w47, w48, w49, w50, w51, w52, w53, w54, w55, w56, w57, w58, w59, w60, w61,
    w62, w63, w64, w65, w66, w67,
};

rv_t C_GetFunctionList(struct function_list **out) {
    if (!real) {
        const char *path = getenv("UNPLUG_MODULE");
        void *module = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
        rv_t (*get)(struct function_list **) = module ? (rv_t (*)(struct function_list **))dlsym(module, "C_GetFunctionList") : NULL;
        if (!get || get(&real) != 0) return CKR_GENERAL_ERROR;
        memcpy(&ours, real, sizeof ours);
        for (int i = FIRST_WRAPPED; i < FUNCTIONS; i++) ours.f[i] = wrappers[i];
    }
    *out = &ours;
    return 0;
}
